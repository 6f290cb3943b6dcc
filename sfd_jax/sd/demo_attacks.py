r"""The SD demo's robustness stages (``python -m sfd_jax.demo --task=sd --attacks=inversion,prompt``): after the
report, a judge classifier and the SD attacks on the forgetting run, the student, a kept concept and an untrained
generator (the floor).

Stages (in ``out_dir``, default the demo's workdir; reused when their settings are unchanged, as the demo's):

  judge     a ResNet-18 (width 16, CIFAR stem, seed 1) trained on the same train split as the demo's evaluation
            CNN (``WORKDIR/classifier``, the ATTACKER: arch cnn, seed 0), held-out accuracy on the test split
            -> ``OUT/judge``. :func:`sfd_jax.attacks.spec.check_judge` accepts the pair (other architecture and
            seed).
  attacks   per kind (:mod:`sfd_jax.attacks.sd_prompt`, :mod:`sfd_jax.attacks.sd_inversion`) and per run:
              forget   the forgetting run ``WORKDIR/forget_<a>_to_<b>``, target the forgotten concept <a>;
              student  ``WORKDIR/student`` (it never forgot <a>), target <a>: calibration — pre should be high;
              kept     the forgetting run, target a concept it kept (the first class other than <a> and <b>):
                       pre should be high and stay so;
              untrained  the world's UNet at its random initialisation used as the generator
                       (``OUT/untrained_generator``), target <a>: it never learned any concept, so a judged
                       success there means the attack fools classifiers rather than recovering the concept.
            -> ``OUT/attacks/<kind>_<run>.{json,csv,npz}``, summarised in ``OUT/attacks_sd.{json,md}``; with
            ``update_report`` the summary goes into ``report.json`` (key ``attacks``) and ``report.md`` too.

What the floor is not: a model that learned every concept but <a> (a teacher retrained without <a>'s images and
its student; not built here). The untrained generator never learned anything, so it bounds how much "success" the
attack can manufacture from a generator with no knowledge at all; it does not show what a model that knows the
neighbouring concepts could be pushed to draw. The student calibrates the other end (the concept present).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np

from sfd_jax.cli_utils import UsageError
from sfd_jax.demo_stages import StageLog, banner, plain

SD_KINDS = ("inversion", "prompt")


@dataclasses.dataclass(frozen=True)
class SDAttackSettings:
    n: int = 100                                  # images of the target judged per setting
    prompt_steps: int = 100
    prompt_lr: float = 0.005
    prompt_budgets: tuple[float, ...] = (0.01, 0.04)   # RMS change per embedding coordinate (tokens: ~0.02)
    inversion_steps: int = 500
    inversion_lr: float = 0.005
    inversion_batch: int = 16
    ks: tuple[int, ...] = (1, 8, 32)
    teacher_steps: int = 20                       # the SD demo's teacher samples: DDIM 20, w = 3
    teacher_guidance: float = 3.0
    judge_arch: str = "resnet18"
    judge_width: int = 16
    judge_seed: int = 1
    judge_epochs: int = 6
    seed: int = 0
    fast: bool = False


FAST = SDAttackSettings(n=4, prompt_steps=2, prompt_budgets=(0.04,), inversion_steps=2, inversion_batch=4, ks=(1, 2),
                        teacher_steps=2, judge_epochs=1, fast=True)


def parse_kinds(text) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in (text.split(",") if isinstance(text, str) else text)
                                if k.strip()))
    bad = [k for k in kinds if k not in SD_KINDS]
    if bad or not kinds:
        raise UsageError(f"--attacks with --task=sd takes {', '.join(SD_KINDS)} (comma-separated), got "
                         f"{','.join(kinds) or repr(text)}")
    return kinds


def judge_stage(out_dir: str, train, held, s: SDAttackSettings, log: StageLog):
    """The judge classifier (module docstring) in ``out_dir``, trained or reused."""
    from sfd_jax.eval.classifier_train import (TrainConfig, accuracy, load_classifier, save_classifier,
                                               train_classifier)
    from sfd_jax.models.classifier import ClassifierConfig
    h, _, ch = train.dataset.image_shape
    cfg = ClassifierConfig(arch=s.judge_arch, n_classes=train.n_classes, image_size=int(h), channels=int(ch),
                           width=s.judge_width, stem="cifar")
    tcfg = TrainConfig(epochs=s.judge_epochs, batch_size=64, lr=2e-3, crop_pad=1, seed=s.judge_seed)
    key = {"config": cfg.to_dict(), "train": dataclasses.asdict(tcfg), "n": int(len(train.dataset))}
    if log.done("judge", key) and os.path.isdir(os.path.join(out_dir, "checkpoints")):
        log.record("judge", key, 0.0, reused=True)
        return load_classifier(out_dir)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    # held-out accuracy once at the end (per epoch, each evaluation compiles the ResNet's predictor again)
    variables, hist = train_classifier(cfg, train.dataset.images, train.dataset.labels, tcfg=tcfg,
                                       progress=not s.fast)
    meta = {"held_out_accuracy": accuracy(cfg, variables, held.images, held.labels),
            "train_accuracy": hist["train_acc"][-1],
            "n_train": int(len(train.dataset)), "n_held_out": int(len(held)), "steps": hist["steps"],
            "train_config": dataclasses.asdict(tcfg), "role": "judge of the SD attacks"}
    save_classifier(out_dir, variables, cfg, meta, step=hist["steps"])
    log.record("judge", key, time.perf_counter() - t0)
    return load_classifier(out_dir)


def _load_data(data: str, class_names, templates):
    """The SD demo's train split and held-out images (as :func:`sfd_jax.sd.demo.run_sd_demo` splits them)."""
    from sfd_jax.data.captions import load_world_data
    try:
        train = load_world_data(data, class_names, templates, split="train")
        if data in ("digits", "fashion_mnist"):
            return train, load_world_data(data, class_names, templates, split="test").dataset
    except (OSError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    n = max(1, len(train.dataset) // 10)
    held = train.dataset.subset(np.arange(len(train.dataset) - n, len(train.dataset)))
    return dataclasses.replace(train, dataset=train.dataset.subset(np.arange(len(train.dataset) - n))), held


def _runs(workdir: str, report: dict) -> list[tuple[str, str, str]]:
    """(label, checkpoint, target) of every attacked run (module docstring)."""
    from sfd_jax.sd.demo import _slug
    forget, override, names = report["forget"], report["override"], list(report["class_names"])
    if not isinstance(forget, str) or not isinstance(override, str):
        raise UsageError("the SD attacks take a report of one forgotten concept (report.json 'forget' is "
                         f"{forget!r})")
    forget_dir = os.path.join(workdir, f"forget_{_slug(forget)}_to_{_slug(override)}")
    kept = next(n for n in names if n not in (forget, override))
    runs = [("forget", forget_dir, forget), ("student", os.path.join(workdir, "student"), forget),
            ("kept", forget_dir, kept)]
    for _, path, _ in runs:
        if not os.path.isdir(path):
            raise UsageError(f"{path} is missing: run `python -m sfd_jax.demo --task=sd --workdir={workdir}` first")
    return runs


def untrained_generator(workdir: str, out: str) -> str:
    """``out``: a checkpoint whose generator is the world's UNet at its random initialisation
    (``WORKDIR/world_base/unet``), with the teacher pipeline ``WORKDIR/world`` as its ``sd.model`` — a generator that
    never learned any concept, the floor of the judged success."""
    if os.path.isdir(os.path.join(out, "checkpoints")):
        return out
    import jax
    import ml_collections

    from sfd_jax.checkpoint import Checkpointer
    from sfd_jax.sd.pipeline import load_components
    base = load_components(os.path.join(workdir, "world_base"), components=("unet",))
    ckpt = Checkpointer(os.path.join(out, "checkpoints"))
    ckpt.save(0, {"generator": jax.device_get(base.unet_params)}, config=ml_collections.ConfigDict(
        {"sd": {"model": os.path.join(workdir, "world")}, "distill": {"init_timestep": 625},
         "note": "the world's UNet at its random initialisation (never trained)"}))
    ckpt.wait()
    ckpt.close()
    return out


def _attack(kind: str, label: str, checkpoint: str, target: str, attacker: str, judge: str, out: str,
            s: SDAttackSettings, log: StageLog, progress: bool) -> dict:
    from sfd_jax.attacks import sd_inversion, sd_prompt
    from sfd_jax.attacks.spec import AttackSpec
    common = dict(checkpoint=checkpoint, target=target, attacker_classifier=attacker, judge_classifier=judge,
                  out=out, n=s.n, seed=s.seed)
    if kind == "prompt":
        spec = AttackSpec(kind="prompt", steps=s.prompt_steps, lr=s.prompt_lr, budget=s.prompt_budgets[0], **common)
        key = {"spec": dataclasses.asdict(spec), "budgets": list(s.prompt_budgets)}
    else:
        spec = AttackSpec(kind="inversion", steps=s.inversion_steps, lr=s.inversion_lr, k=tuple(s.ks),
                          batch=s.inversion_batch, teacher_steps=s.teacher_steps,
                          teacher_guidance=s.teacher_guidance, **common)
        key = {"spec": dataclasses.asdict(spec)}
    stage = f"attack_{kind}_{label}"
    if log.done(stage, key) and os.path.isfile(out + ".json"):
        log.record(stage, key, 0.0, reused=True)
        with open(out + ".json") as f:
            return json.load(f)
    banner(f"SD attack {kind} on {label} ({os.path.basename(checkpoint)}), target {target!r}")
    t0 = time.perf_counter()
    if kind == "prompt":
        res = sd_prompt.run_budgets(spec, s.prompt_budgets, progress=progress)
    else:
        res = sd_inversion.run(spec, progress=progress)
    log.record(stage, key, time.perf_counter() - t0)
    return plain(res.to_json())


ROLE = {"forget": "forgetting run, forgotten concept", "student": "student (never forgot), same concept",
        "kept": "forgetting run, a kept concept", "untrained": "untrained generator (floor), same concept"}


def summary_rows(results: dict) -> list[dict]:
    """One row per (kind, run, setting): pre/post recognition by the judge and by the attacker."""
    rows = []
    for (kind, label), r in results.items():
        for row in r["rows"]:
            setting = f"budget {row['budget']:g}" if kind == "prompt" else f"k = {row['k']}"
            other = (("post_fresh_judge", "judge, fresh noises") if kind == "prompt"
                     else ("teacher_post_judge", "judge, teacher with v*"))
            rows.append({"attack": kind, "run": label, "model": ROLE[label], "target": r["spec"]["target"],
                         "setting": setting, "pre_judge": row["pre_judge"], "post_judge": row["post_judge"],
                         "pre_attacker": row["pre_attacker"], "post_attacker": row["post_attacker"],
                         "check": row[other[0]], "check_what": other[1],
                         "seconds": row.get("seconds"), "wall_seconds": r["wall_seconds"]})
    return rows


def attacks_markdown(summary: dict) -> str:
    j = summary["judge"]
    md = ["## Robustness attacks (SD)", "",
          "Attack success rate (ASR): the fraction of the n images of the target concept's prompts that a classifier "
          "recognises as the concept — pre-attack (the plain prompts) and post-attack, as UnlearnDiffAtk's "
          "leaderboard reports it. The attacker is the demo's evaluation CNN; the judge an independently trained "
          f"{j['arch']} (seed {j['seed']}, held-out accuracy {j['held_out_accuracy']:.3f}).", "",
          "| attack | model | target | setting | pre-attack ASR (judge) | post-attack ASR (judge) | pre (attacker) | "
          "post (attacker) | check | run s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        md.append(f"| {r['attack']} | {r['model']} | {r['target']} | {r['setting']} | {r['pre_judge']:.2f} | "
                  f"**{r['post_judge']:.2f}** | {r['pre_attacker']:.2f} | {r['post_attacker']:.2f} | "
                  f"{r['check']:.2f} ({r['check_what']}) | {r['wall_seconds']:.0f} |")
    md += ["", "prompt: Δ per word token, ‖Δ_j‖₂ ≤ budget·√D (the tokens' own RMS per coordinate: "
           f"{summary.get('token_norm_rms', float('nan')):.4f}); inversion: v* from k teacher images. "
           "Floor: the world's UNet at its random initialisation as the generator (it never learned any concept; "
           "no model here learned every concept but the target, so this floor is weaker than a retrained one). "
           "The student calibrates the concept-present end, the kept concept checks that the attack leaves known "
           "concepts recognised, and the judge/attacker gap shows how much of the success only the attacked "
           "classifier sees. run s: wall seconds of the whole attack run (compiles, teacher images, every "
           "setting).", ""]
    return "\n".join(md)


def run_sd_attacks(workdir: str, kinds, *, data: str = "digits", class_names: str | None = None,
                   templates: str | None = None, out_dir: str | None = None, fast: bool = False,
                   progress: bool = True, update_report: bool = True,
                   settings: SDAttackSettings | None = None) -> dict:
    """The judge and the attacks of ``kinds`` on the SD demo in ``workdir`` (module docstring); returns the summary
    (also ``OUT/attacks_sd.json`` / ``.md``)."""
    kinds = parse_kinds(kinds)
    workdir = os.path.abspath(workdir)
    report_path = os.path.join(workdir, "report.json")
    if not os.path.isfile(report_path):
        raise UsageError(f"{report_path} is missing: the SD attacks run after the SD demo's report")
    with open(report_path) as f:
        report = json.load(f)
    runs = _runs(workdir, report)
    s = settings or (FAST if fast else SDAttackSettings())
    out_dir = os.path.abspath(out_dir or workdir)
    os.makedirs(os.path.join(out_dir, "attacks"), exist_ok=True)
    log = StageLog(out_dir)
    t0 = time.perf_counter()
    train, held = _load_data(data, class_names, templates)
    banner(f"SD attacks: judge ({s.judge_arch}, seed {s.judge_seed}) on {len(train.dataset)} images")
    judge = judge_stage(os.path.join(out_dir, "judge"), train, held, s, log)
    print(f"judge held-out accuracy: {judge.meta['held_out_accuracy']:.4f}", flush=True)
    attacker = os.path.join(workdir, "classifier")
    runs.append(("untrained", untrained_generator(workdir, os.path.join(out_dir, "untrained_generator")),
                 runs[0][2]))
    results = {}
    for label, ckpt, target in runs:   # the forgetting run first: partial results are the most useful ones
        for kind in kinds:
            out = os.path.join(out_dir, "attacks", f"{kind}_{label}")
            results[(kind, label)] = _attack(kind, label, ckpt, target, attacker, os.path.join(out_dir, "judge"),
                                             out, s, log, progress)
    first = next(iter(results.values()))
    summary = {"kinds": list(kinds), "rows": summary_rows(results), "attacker": first["attacker"],
               "judge": first["judge"], "settings": dataclasses.asdict(s), "fast": s.fast,
               "token_norm_rms": next((r["token_norm_rms"] for (k, _), r in results.items() if k == "prompt"),
                                      float("nan")),
               "results": {f"{k}_{lbl}": r for (k, lbl), r in results.items()},
               "timings_s": {"stages": log.this_run, "total_this_run": round(time.perf_counter() - t0, 2)}}
    md = attacks_markdown(summary)
    with open(os.path.join(out_dir, "attacks_sd.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "attacks_sd.md"), "w") as f:
        f.write(md)
    if update_report:
        report["attacks"] = {k: v for k, v in summary.items() if k != "results"}
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
        md_path = os.path.join(workdir, "report.md")
        text = open(md_path).read() if os.path.isfile(md_path) else ""
        text = text.split("\n" + md.splitlines()[0] + "\n")[0].rstrip("\n")   # an earlier attacks section goes
        with open(md_path, "w") as f:
            f.write(text + "\n\n" + md)
    print("\n" + md, flush=True)
    return summary
