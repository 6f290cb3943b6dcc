r"""The leaderboard's robustness columns: ``python -m sfd_jax.demo --methods=... --attacks=latent,relearn``.

After the leaderboard's own stages, per method (its final run, the weights the leaderboard samples) and attack:
``W/attacks/<method>_<attack>.json`` / ``.csv`` (:mod:`sfd_jax.attacks.latent`, :mod:`sfd_jax.attacks.relearn`),
with the leaderboard's classifier ``W/classifier`` (CNN, seed 0) as the ATTACKER and ``W/judge`` (a ResNet-18,
seed 1, trained here on the same digits train split) as the JUDGE. Both stages are reused when their files are there
with the same settings (the judge: ``W/judge/judge_stage.json``; an attack: the ``stage_key`` stored in its JSON:
settings, the attacked run's newest step, both classifiers' fingerprints), so results computed earlier by the same
code are picked up. Settings (:data:`SETTINGS`; ``--fast``: :data:`FAST_SETTINGS`, meaningless numbers):

- latent: 32 samples of the forgotten digit per method, PGD with Adam (lr 0.1, 20 steps) on the input noise,
  ‖δ‖₂ ≤ 0.5·√64 per sample (half the noise's own RMS per entry); the DDIM models through their 20-step,
  guidance-2 sampler (the leaderboard's).
- relearn: k = 1, 8, 32 real train-split images of the forgotten digit, Adam lr 1e-4, batch 32, up to 200 steps,
  judged on 32 samples every 10 steps; steps until the judge recognises ≥ 50 %.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from sfd_jax.cli_utils import UsageError

ATTACKS = ("latent", "relearn")
STAGE_VERSION = 2       # part of every attack stage's key: results of older attack code are not reused
JUDGE = {"arch": "resnet18", "epochs": 5, "batch_size": 128, "lr": 3e-3, "crop_pad": 1, "seed": 1}
FAST_JUDGE = dict(JUDGE, epochs=1)
SETTINGS = {"latent": dict(n=32, steps=20, lr=0.1, budget=0.5),
            "relearn": dict(n=32, steps=200, lr=1e-4, k=(1, 8, 32), eval_every=10, batch=32)}
FAST_SETTINGS = {"latent": dict(n=4, steps=2, lr=0.1, budget=0.5),
                 "relearn": dict(n=4, steps=2, lr=1e-4, k=(1,), eval_every=1, batch=4)}


def parse_attacks(text: str) -> list[str]:
    """'latent,relearn' -> ['latent', 'relearn'] (order kept, duplicates dropped); '' -> []; unknown: UsageError."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    bad = [n for n in names if n not in ATTACKS]
    if bad:
        raise UsageError(f"--attacks: unknown attack {bad[0]!r}; choose from {', '.join(ATTACKS)}")
    return list(dict.fromkeys(names))


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _record(log, name: str, key, seconds: float, reused: bool) -> None:
    if log is not None:
        log.record(name, key, seconds, reused=reused)


def judge_stage(workdir: str, *, fast: bool = False, log=None, progress: bool = True) -> str:
    """Train (or reuse) ``W/judge``: a ResNet-18 (CIFAR stem, seed 1) on the digits train split, held-out accuracy
    on the test split. Returns its directory. ``log``: a :class:`~sfd_jax.demo_stages.StageLog` to record in."""
    from sfd_jax.demo_stages import plain
    from sfd_jax.eval.classifier_train import train_on_dataset
    out = os.path.join(workdir, "judge")
    settings = FAST_JUDGE if fast else JUDGE
    key = plain({"dataset": "digits", **settings})
    marker = os.path.join(out, "judge_stage.json")
    done = _read_json(marker)
    if done is not None and done.get("key") == key and os.path.isdir(os.path.join(out, "checkpoints")):
        print(f"judge: reusing {out} (held-out accuracy {done['held_out_accuracy']:.4f})", flush=True)
        _record(log, "judge", key, 0.0, True)
        return out
    t0 = time.perf_counter()
    s = settings
    _, meta, _ = train_on_dataset("digits", out, arch=s["arch"], epochs=s["epochs"], batch_size=s["batch_size"],
                                  lr=s["lr"], seed=s["seed"], crop_pad=s["crop_pad"], progress=progress)
    seconds = time.perf_counter() - t0
    with open(marker, "w") as f:
        json.dump({"key": key, "seconds": round(seconds, 2), "held_out_accuracy": meta["held_out_accuracy"]}, f,
                  indent=2)
    print(f"judge: {s['arch']} held-out accuracy {meta['held_out_accuracy']:.4f} ({seconds:.0f} s)", flush=True)
    _record(log, "judge", key, seconds, False)
    return out


def attack_stage(kind: str, method: str, run_dir: str, weights: str, workdir: str, forget: int, *,
                 fast: bool = False, log=None, progress: bool = True) -> dict:
    """Run (or reuse) attack ``kind`` on one method's run; returns the result's JSON (see the module docstring)."""
    import importlib

    from sfd_jax.attacks.spec import AttackSpec, fingerprint
    from sfd_jax.demo_stages import latest_step, plain
    from sfd_jax.eval.classifier_train import load_classifier

    attacker, judge = os.path.join(workdir, "classifier"), os.path.join(workdir, "judge")
    out = os.path.join(workdir, "attacks", f"{method}_{kind}")
    spec = AttackSpec(kind=kind, checkpoint=os.path.abspath(run_dir), target=str(int(forget)),
                      attacker_classifier=attacker, judge_classifier=judge, out=out, weights=weights, seed=0,
                      **(FAST_SETTINGS if fast else SETTINGS)[kind])
    key = plain({"version": STAGE_VERSION, "spec": dataclasses.asdict(spec), "step": latest_step(run_dir),
                 "attacker": fingerprint(load_classifier(attacker).variables),
                 "judge": fingerprint(load_classifier(judge).variables)})
    name = f"attack_{kind}_{method}"
    done = _read_json(out + ".json")
    if done is not None and done.get("stage_key") == key:
        print(f"{name}: reusing {out}.json", flush=True)
        _record(log, name, key, 0.0, True)
        return done
    module = importlib.import_module(f"sfd_jax.attacks.{kind}")
    result = module.run(spec, progress=progress)
    result.extra["stage_key"] = key
    result.write()
    _record(log, name, key, result.wall_seconds, False)
    return result.to_json()


def run_attacks(workdir: str, forget: int, runs: list[tuple[str, str, str]], attacks, *, fast: bool = False,
                log=None, progress: bool = True) -> dict:
    """The judge, then every attack on every ``(method, run_dir, weights)``; the board's ``attacks`` entry."""
    from sfd_jax.demo_stages import banner
    from sfd_jax.eval.classifier_train import load_classifier
    banner(f"attacks: {', '.join(attacks)} on {', '.join(m for m, _, _ in runs)} (judge: W/judge)")
    judge_dir = judge_stage(workdir, fast=fast, log=log, progress=progress)
    per_method = []
    for method, run_dir, weights in runs:
        entry = {"method": method}
        for kind in attacks:
            res = attack_stage(kind, method, run_dir, weights, workdir, forget, fast=fast, log=log,
                               progress=progress)
            entry[kind] = {"rows": res["rows"], "wall_seconds": res["wall_seconds"], "model": res.get("model")}
        per_method.append(entry)
    judge, attacker = load_classifier(judge_dir), load_classifier(os.path.join(workdir, "classifier"))
    for entry in per_method:
        for kind in attacks:
            both = recognised_by_both(os.path.join(workdir, "attacks", f"{entry['method']}_{kind}.npz"), attacker,
                                      judge, int(forget))
            for row in entry[kind]["rows"]:
                row["post_both"] = both.get("post" if kind == "latent" else f"k{row['k']}")
    marker = _read_json(os.path.join(judge_dir, "judge_stage.json")) or {}
    return {"kinds": list(attacks), "settings": {k: (FAST_SETTINGS if fast else SETTINGS)[k] for k in attacks},
            "judge": {"arch": judge.config.arch, "seed": judge.meta.get("train_config", {}).get("seed"),
                      "held_out_accuracy": judge.meta.get("held_out_accuracy"),
                      "train_seconds": marker.get("seconds")},
            "attacker": {"arch": attacker.config.arch, "width": attacker.config.width,
                         "seed": attacker.meta.get("train_config", {}).get("seed"),
                         "held_out_accuracy": attacker.meta.get("held_out_accuracy")},
            "rows": per_method}


def recognised_by_both(npz_path: str, attacker, judge, target: int) -> dict:
    """{array name: share of its images that the judge AND the attacker recognise as ``target``} for an attack's
    ``OUT.npz`` (uint8 NHWC); {} when there is none. Neither classifier alone: a judge can call noise a digit."""
    import numpy as np

    from sfd_jax.eval.classifier_train import predict_logits
    if not os.path.exists(npz_path):
        return {}
    out = {}
    with np.load(npz_path) as z:
        for name in z.files:
            x = z[name]
            pa = predict_logits(attacker.config, attacker.variables, x).argmax(-1)
            pj = predict_logits(judge.config, judge.variables, x).argmax(-1)
            out[name] = float(np.mean((pa == target) & (pj == target)))
    return out


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _steps(v) -> str:
    return "never" if v is None else str(v)


def _attacker_steps(row: dict) -> str:
    """The attacker's steps to 50 %; '> N' when the run of that k stopped at N (the judge's hit) before it."""
    v = row["steps_to_50_attacker"]
    if v is None and row.get("steps_run", row.get("max_steps")) != row.get("max_steps"):
        return f"> {row['steps_run']}"
    return _steps(v)


def attacks_markdown(a: dict) -> list[str]:
    """The leaderboard.md section of the ``attacks`` entry."""
    j, at = a["judge"], a["attacker"]
    md = ["", "## Attacks: does the forgotten digit come back?", "",
          f"Judge: {j['arch']} (seed {j['seed']}, held-out accuracy {j['held_out_accuracy']:.3f}), trained "
          f"independently of the attacker, the leaderboard's {at['arch']} (width {at['width']}, seed {at['seed']}); "
          "the attacks optimise against the attacker only. Recognition: the share of the attacked samples of the "
          "forgotten digit that a classifier recognises as it; 'both': recognised by the judge and the attacker "
          "(a classifier alone can call noise a digit).", ""]
    if "latent" in a["kinds"]:
        s = a["settings"]["latent"]
        md += [f"**latent** (PGD with Adam on the input noise, {s['steps']} steps, lr {s['lr']:g}, ‖δ‖₂ ≤ "
               f"{s['budget']:g}·√dim per sample, {s['n']} samples; DDIM models through their sampler):", "",
               "| method | judge: before → after | attacker: before → after | both after | mean ‖δ‖/√dim | s |",
               "|---|---|---|---|---|---|"]
        for r in a["rows"]:
            x = r["latent"]["rows"][0]
            md.append(f"| {r['method']} | {_pct(x['pre_judge'])} → **{_pct(x['post_judge'])}** | "
                      f"{_pct(x['pre_attacker'])} → {_pct(x['post_attacker'])} | {_pct(x.get('post_both'))} | "
                      f"{x['mean_delta_rms']:.3f} | {r['latent']['wall_seconds']:.0f} |")
        md.append("")
    if "relearn" in a["kinds"]:
        s = a["settings"]["relearn"]
        ks = list(s["k"])
        md += [f"**relearn** (fine-tune on k real images of the forgotten digit, Adam lr {s['lr']:g}, batch "
               f"{s['batch']}, up to {s['steps']} steps, judged on {s['n']} samples every {s['eval_every']} steps): "
               "steps until ≥ 50 % are recognised ('never': not within the budget; 'retrain' never learned the "
               "digit: the floor; a k stops when the judge reaches 50 %: '> N' = the attacker had not by then). "
               "'both': the share of the last samples that judge and attacker both recognise.", "",
               "| method | " + " | ".join(f"judge k={k}" for k in ks) + " | "
               + " | ".join(f"attacker k={k}" for k in ks) + " | judge / both at the end (per k) | s |",
               "|---|" + "---|" * (2 * len(ks) + 2)]
        for r in a["rows"]:
            rows = {x["k"]: x for x in r["relearn"]["rows"]}
            md.append(f"| {r['method']} | " + " | ".join(_steps(rows[k]["steps_to_50_judge"]) for k in ks) + " | "
                      + " | ".join(_attacker_steps(rows[k]) for k in ks) + " | "
                      + ", ".join(f"{_pct(rows[k]['post_judge'])} / {_pct(rows[k].get('post_both'))}" for k in ks)
                      + f" | {r['relearn']['wall_seconds']:.0f} |")
    return md
