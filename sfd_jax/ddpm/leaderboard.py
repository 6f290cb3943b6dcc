r"""The digits leaderboard: SFD beside the original release's baselines, on one teacher and one classifier.

  python -m sfd_jax.demo --methods=sfd,retrain,sa,salun,esd [--forget=K] [--workdir=W]

Stages (each reused when its outputs are in ``W``, as the demo's): the demo's teacher and evaluation classifier,
then per method its runs — ``sfd``: ``W/sfd_forget<K>`` (configs/digits_sfd.py); ``retrain``: ``W/retrain_forget<K>``
(configs/digits_retrain.py); ``sa``: ``W/sa_fim_forget<K>`` then ``W/sa_forget<K>`` (configs/digits_sa.py[:fim]);
``salun``: ``W/salun_mask_forget<K>`` then ``W/salun_forget<K>`` (configs/digits_salun.py[:mask]); ``esd``:
``W/esd_forget<K>`` (configs/digits_esd.py). Then 100 samples per class of the teacher and of every method
(``W/samples_teacher.npz``, ``W/samples_<method>.npz``: ``images`` uint8 NHWC 8×8×1, ``labels`` = the
conditioning class) and ``W/leaderboard.md`` / ``W/leaderboard.json``, one row per method:

- forgotten-class accuracy: the share of samples conditioned on K that the classifier recognises as K;
- the mean accuracy of the other nine classes;
- FID on the classifier's penultimate features: the samples of the nine remaining classes against the held-out
  (test-split) real digits of those classes;
- network evaluations per image (1 for SFD's one-step generator; steps × 2 for the DDIM samplers with guidance);
- training wall time (the method's stages when they ran, teacher and classifier excluded);
- the data the method used.

``--attacks=latent,relearn`` then adds, per method, the robustness attacks with an independent judge
(:mod:`sfd_jax.ddpm.leaderboard_attacks`: ``W/judge``, ``W/attacks/<method>_<attack>.json``) and their table.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from sfd_jax.cli_utils import UsageError

METHODS = ("sfd", "retrain", "sa", "salun", "esd")
DATA_USED = {
    "teacher": "real, all classes",
    "sfd": "none (data-free)",
    "retrain": "real remain",
    "sa": "generated (replay from the teacher)",
    "salun": "real remain + real forget",
    "esd": "none (self-generated trajectories)",
}
# Raw weights for every network trained here: a short run's EMA still holds much of its start (the teacher, or
# for retrain the random initialisation); the teacher's EMA.
WEIGHTS = {"teacher": "ema", "sfd": "raw", "retrain": "raw", "sa": "raw", "salun": "raw", "esd": "raw"}


def parse_methods(text: str) -> list[str]:
    """'sfd,retrain' -> ['sfd', 'retrain'] (order kept, duplicates dropped); an unknown name is a UsageError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise UsageError(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}" if bad else
                         f"--methods is empty; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------ configs
def method_configs(method: str, workdir: str, teacher_dir: str, forget: int, fast: bool) -> list[tuple]:
    """[(stage name, config, run dir)] of one method, in order (the second stage reads the first's artifact)."""
    from sfd_jax.ddpm import demo
    from sfd_jax.ddpm.config import sibling_config
    if method == "sfd":
        return [(f"sfd_forget{forget}", demo.sfd_config(teacher_dir, forget, fast),
                 os.path.join(workdir, f"sfd_forget{forget}"))]
    stages = {"retrain": [("retrain", "digits_retrain", None)], "esd": [("esd", "digits_esd", None)],
              "sa": [("sa_fim", "digits_sa", "fim"), ("sa", "digits_sa", "sa")],
              "salun": [("salun_mask", "digits_salun", "mask"), ("salun", "digits_salun", "salun")]}[method]
    out = []
    for name, recipe, variant in stages:
        c = sibling_config(str(demo.configs_dir() / "digits_pretrain.py"), recipe, *([variant] if variant else []))
        c.unlearn.label_to_forget = int(forget)
        if name != "retrain":
            c.init_checkpoint = os.path.abspath(teacher_dir)
        if fast:
            _shrink_baseline(c)
        run_dir = os.path.join(workdir, f"{name}_forget{forget}")
        if name == "sa":
            c.unlearn.fisher_path = out[0][2]
        if name == "salun":
            c.unlearn.mask_path = out[0][2]
        out.append((f"{name}_forget{forget}", c, run_dir))
    return out


def _shrink_baseline(c) -> None:
    """--fast: the demo's tiny model and a few steps of every stage (numbers mean nothing)."""
    from sfd_jax.ddpm.demo import shrink_config
    shrink_config(c, n_iters=2, batch=8)
    u = c.unlearn
    if "n_replay_per_class" in u:
        u.n_replay_per_class, u.replay_steps, u.fisher_n_samples = 2, 2, 2
        u.fisher_timestep_stride, u.n_chunks = 100, 1
    if "ddim_steps" in u:
        u.ddim_steps = 5
    if "forget_batch_size" in u:
        u.forget_batch_size = 8


def _train(name: str, config, run_dir: str, log) -> None:
    """Run (or resume, or reuse) one baseline stage; artifact stages are done when their artifact is written."""
    from sfd_jax.ddpm.baseline_trainer import BaselineTrainer
    from sfd_jax.ddpm.baselines import ARTIFACT_MODES
    from sfd_jax.demo_stages import latest_step, train_stage
    artifact = {"sa_fim": "fisher.npz", "salun_mask": "mask.npz"}.get(config.mode)

    def finished() -> bool:
        if config.mode in ARTIFACT_MODES:
            return os.path.exists(os.path.join(run_dir, artifact))
        latest = latest_step(run_dir)
        return latest is not None and latest >= int(config.training.n_iters)

    train_stage(name, lambda: BaselineTrainer(config, run_dir).run(), config, run_dir, log, finished=finished)


# ------------------------------------------------------------------------------------------------ metrics
def penultimate_features(clf, images_uint8: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """float32 [N, D]: the classifier's input to its final dense layer ``fc`` for uint8 NHWC images."""
    import flax.linen as nn
    import jax
    from sfd_jax.eval.classifier_train import to_model_input

    def features(variables, x):
        seen = {}

        def grab(next_fun, args, kwargs, context):
            if context.module.name == "fc" and context.method_name == "__call__":
                seen["x"] = args[0]
            return next_fun(*args, **kwargs)
        with nn.intercept_methods(grab):
            clf.model.apply(variables, x, train=False)
        return seen["x"].astype(np.float32)

    fn = jax.jit(features)
    out = [np.asarray(fn(clf.variables, to_model_input(images_uint8[i:i + batch_size])))
           for i in range(0, len(images_uint8), batch_size)]
    return np.concatenate(out)


def feature_fid(clf, real_uint8: np.ndarray, fake_uint8: np.ndarray) -> float:
    """Fréchet distance between the penultimate-feature Gaussians of two image sets."""
    from sfd_jax.eval.metrics import frechet_distance, mean_cov
    mu_r, s_r = mean_cov(penultimate_features(clf, real_uint8))
    mu_f, s_f = mean_cov(penultimate_features(clf, fake_uint8))
    return float(frechet_distance(mu_r, s_r, mu_f, s_f))


def method_row(method: str, clf, images, labels, forget: int, real_remain, nfe: int, seconds: float) -> dict:
    from sfd_jax.eval.classifier_train import predict_logits
    from sfd_jax.eval.forgetting import forgetting_metrics
    logits = predict_logits(clf.config, clf.variables, images)
    ev = forgetting_metrics(logits, labels, forget)
    keep = labels != forget
    return {"method": method, "forgotten_class_accuracy": ev["per_class"][str(forget)]["accuracy"],
            "remaining_mean_accuracy": ev["mean_accuracy_remaining"],
            "fid_penultimate_remaining": feature_fid(clf, real_remain, images[keep]),
            "nfe_per_image": int(nfe), "train_seconds": round(float(seconds), 1), "data_used": DATA_USED[method],
            "per_class_accuracy": {c: v["accuracy"] for c, v in ev["per_class"].items()},
            "forgotten_recognised_as": np.bincount(logits[labels == forget].argmax(-1), minlength=10).tolist()}


# --------------------------------------------------------------------------------------------------- main
def run_leaderboard(workdir: str = "demo_out", forget: int = 0, methods=METHODS, *, fast: bool = False,
                    progress: bool = True, attacks=()) -> dict:
    """Run (or reuse) every stage in ``workdir``; returns the leaderboard (also W/leaderboard.{json,md}).

    ``attacks``: names among :data:`sfd_jax.ddpm.leaderboard_attacks.ATTACKS`; each runs on every method's final
    run and adds the board's ``attacks`` entry (:func:`sfd_jax.ddpm.leaderboard_attacks.run_attacks`)."""
    from sfd_jax.ddpm import demo
    from sfd_jax.data import load_dataset

    if not 0 <= int(forget) <= 9:
        raise UsageError(f"--forget must be a digit 0..9, got {forget}")
    methods = parse_methods(",".join(methods)) if not isinstance(methods, str) else parse_methods(methods)
    if attacks:
        from sfd_jax.ddpm.leaderboard_attacks import parse_attacks
        attacks = parse_attacks(attacks if isinstance(attacks, str) else ",".join(attacks))
    runs = []
    t_start = time.perf_counter()
    s = demo.FAST if fast else demo.DemoSettings()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    log = demo.StageLog(workdir)
    t_cfg = demo.teacher_config(fast)
    teacher_dir = os.path.join(workdir, "teacher")
    demo.banner("teacher and evaluation classifier")
    demo.train_stage(t_cfg, teacher_dir, "teacher", log)
    clf = demo.classifier_stage(os.path.join(workdir, "classifier"), s, log, progress)

    sp = t_cfg.sampling
    ddim = dict(sampler=str(sp.grid_sampler), steps=int(sp.grid_steps), eta=0.0, cond_scale=float(sp.grid_cond_scale))
    ddim_nfe = int(sp.grid_steps) * (2 if float(sp.grid_cond_scale) != 0.0 else 1)
    real = load_dataset("digits", split="test")
    real_remain = real.images[real.labels != forget]
    imgs, labels = demo.sample_stage("samples_teacher", os.path.join(workdir, "samples_teacher.npz"), teacher_dir,
                                     WEIGHTS["teacher"], ddim, s, log, progress)
    rows = [method_row("teacher", clf, imgs, labels, forget, real_remain, ddim_nfe, log.data["teacher"]["seconds"])]
    for method in methods:
        demo.banner(f"{method}: forgetting digit {forget}")
        stages = method_configs(method, workdir, teacher_dir, forget, fast)
        for name, cfg, run_dir in stages:
            if method == "sfd":
                demo.train_stage(cfg, run_dir, name, log)
            else:
                _train(name, cfg, run_dir, log)
        kw, nfe = (dict(sampler="one_step"), 1) if method == "sfd" else (ddim, ddim_nfe)
        imgs, labels = demo.sample_stage(f"samples_{method}", os.path.join(workdir, f"samples_{method}.npz"),
                                         stages[-1][2], WEIGHTS[method], kw, s, log, progress)
        seconds = sum(log.data[name]["seconds"] for name, _, _ in stages)
        rows.append(method_row(method, clf, imgs, labels, forget, real_remain, nfe, seconds))
        rows[-1]["weights"] = WEIGHTS[method]
        runs.append((method, stages[-1][2], WEIGHTS[method]))
    board = {"forget_class": int(forget), "fast": bool(fast), "rows": rows,
             "classifier_held_out_accuracy": clf.meta["held_out_accuracy"],
             "n_per_class": s.n_per_class, "n_real_remaining": int(len(real_remain)),
             "sampler": {**ddim, "nfe": ddim_nfe}, "wall_seconds_this_run": round(time.perf_counter() - t_start, 1),
             "stages": log.this_run}
    if attacks:
        from sfd_jax.ddpm.leaderboard_attacks import run_attacks
        board["attacks"] = run_attacks(workdir, forget, runs, attacks, fast=fast, log=log, progress=progress)
        board["wall_seconds_this_run"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(workdir, "leaderboard.json"), "w") as f:
        json.dump(board, f, indent=2)
    with open(os.path.join(workdir, "leaderboard.md"), "w") as f:
        f.write(leaderboard_markdown(board))
    print("\n" + leaderboard_markdown(board), flush=True)
    return board


def leaderboard_markdown(b: dict) -> str:
    k = b["forget_class"]
    md = [f"# Forgetting digit {k}: SFD and the baselines on 8×8 digits", ""]
    if b["fast"]:
        md += ["**`--fast` run: every stage was shrunk to seconds; the numbers below mean nothing.**", ""]
    md += ["| method | forgotten digit recognised | other digits recognised (mean) | FID (classifier features, "
           "remaining digits) | network evaluations / image | training s | data used |",
           "|---|---|---|---|---|---|---|"]
    for r in b["rows"]:
        md.append(f"| {r['method']} | {r['forgotten_class_accuracy']:.3f} | {r['remaining_mean_accuracy']:.3f} | "
                  f"{r['fid_penultimate_remaining']:.2f} | {r['nfe_per_image']} | {r['train_seconds']:.0f} | "
                  f"{r['data_used']} |")
    sp = b["sampler"]
    md += ["", f"Samples: {b['n_per_class']} per class; SFD with its one-step generator, the others with "
           f"{sp['sampler'].upper()} {sp['steps']} steps, η 0, guidance s={sp['cond_scale']:g}. Accuracies and "
           f"features from the demo's classifier (held-out accuracy {b['classifier_held_out_accuracy']:.3f}); FID "
           f"against the {b['n_real_remaining']} test-split digits of the other classes. Training seconds: the "
           "method's own stages when they ran (the teacher row: its pretraining).", "",
           "The forgotten digit's samples are recognised as (digit: count):", ""]
    for r in b["rows"]:
        counts = ", ".join(f"{c}: {n}" for c, n in enumerate(r["forgotten_recognised_as"]) if n)
        md.append(f"- {r['method']}: {counts}")
    if "attacks" in b:
        from sfd_jax.ddpm.leaderboard_attacks import attacks_markdown
        md += attacks_markdown(b["attacks"])
    return "\n".join(md) + "\n"
