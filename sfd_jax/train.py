r"""Training entry point for all modes: DDPM pretraining, DDPM SFD/SiD distillation, Stable Diffusion SFD,
Stable Diffusion text-to-image training (``sd_pretrain``).

  python -m sfd_jax.train --config=configs/cifar10_sfd.py --workdir=runs/sfd \
      --config.init_checkpoint=ckpt.pth --config.distill.label_to_forget=3
  python -m sfd_jax.train --config=configs/sd15_celebrity.py --workdir=runs/brad_pitt \
      --config.sd.model=PATH/stable-diffusion-v1-5 --config.prompts.remain=PATH/aesthetics_6_plus.txt

A ``--workdir`` that already holds checkpoints of the same recipe resumes from the newest one; per-step
randomness is ``fold_in(key(seed), step)``, so the resumed run reproduces the uninterrupted one.
"""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from sfd_jax.cli_utils import UsageError, run

config_flags.DEFINE_config_file("config", None, "Recipe config (configs/<recipe>.py) with --config.x.y overrides.",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Output root: checkpoints/, metrics.jsonl, tb/, samples/, config.json.")
flags.DEFINE_integer("sigterm_at_step", None, "Testing aid: send SIGTERM to this process after this many steps.")
flags.DEFINE_list("allow_config_change", [], "On resume, accept these changed settings (dotted keys, or prefixes "
                  "ending in '.'); the change is recorded in WORKDIR/config_changes.jsonl. Schedule keys (n_iters, "
                  "log/snapshot frequencies, sampling, mesh) never need it.")
FLAGS = flags.FLAGS

MODES = ("pretrain", "sfd", "sd_sfd", "sd_pretrain")
# The original's comparison methods (sfd_jax.ddpm.baselines; README: "The original release and our differences" ›
# Baselines).
BASELINE_MODES = ("retrain", "sa_fim", "sa", "salun_mask", "salun", "esd")
MODES = MODES + BASELINE_MODES


def validate_config(config) -> None:
    """Fail early, with one line, on settings that cannot run."""
    if config.get("mode") not in MODES:
        raise UsageError(f"config.mode must be one of {', '.join(MODES)}, got {config.get('mode')!r}")
    if config.mode == "sd_sfd":
        from sfd_jax.sd.task import validate_sd_config
        return validate_sd_config(config)
    if config.mode == "sd_pretrain":
        from sfd_jax.sd.pretrain import validate_sd_pretrain_config
        return validate_sd_pretrain_config(config)
    if config.dtype not in ("float32", "bfloat16"):
        raise UsageError(f"config.dtype must be float32 or bfloat16, got {config.dtype!r}")
    t = config.training
    if t.batch_size < 1 or t.n_iters < 1 or t.snapshot_freq < 1 or t.log_freq < 1:
        raise UsageError("training.batch_size, n_iters, snapshot_freq and log_freq must be >= 1")
    if config.mode in BASELINE_MODES:
        from sfd_jax.ddpm.baseline_trainer import validate_baseline_config
        return validate_baseline_config(config)
    if config.mode == "pretrain" and "optim" not in config:
        raise UsageError("config has no optim section: pretraining needs a *_train.py recipe (e.g. configs/cifar10_train.py)")
    if config.mode == "sfd":
        for section in ("distill", "g_optim", "sg_optim"):
            if section not in config:
                raise UsageError(f"config has no {section} section: SFD needs a distillation recipe (e.g. configs/cifar10_sfd.py)")
        from sfd_jax.ddpm.task import DDPMTask
        try:
            DDPMTask.from_config(config)
        except ValueError as e:
            raise UsageError(str(e)) from None
        d = config.distill
        if d.get("label_to_override", None) is None and d.pseudo_label_type in ("amax", "prob"):
            if not d.get("use_clf", False) or not d.get("clf_path", ""):
                raise UsageError(f"distill.pseudo_label_type={d.pseudo_label_type!r} needs distill.use_clf=True and "
                                 "distill.clf_path")
            if not os.path.exists(d.clf_path):
                raise FileNotFoundError(f"distill.clf_path {d.clf_path!r} does not exist")
        if not config.init_checkpoint:
            raise UsageError("config.init_checkpoint is empty: SFD starts from a pretrained (or stage-1) checkpoint")
        if not os.path.exists(config.init_checkpoint):
            raise FileNotFoundError(f"config.init_checkpoint {config.init_checkpoint!r} does not exist")


def make_trainer(config, workdir: str, *, allow_changes=()):
    """The trainer of ``config.mode`` for ``workdir``, after validating the config (one-line UsageError)."""
    validate_config(config)
    if config.mode == "sd_sfd":
        from sfd_jax.sd.trainer import SDTrainer
        return SDTrainer(config, workdir, allow_changes=tuple(allow_changes))
    if config.mode == "sd_pretrain":
        from sfd_jax.sd.pretrain import SDPretrainTrainer
        return SDPretrainTrainer(config, workdir, allow_changes=tuple(allow_changes))
    if config.mode in BASELINE_MODES:
        from sfd_jax.ddpm.baseline_trainer import BaselineTrainer
        return BaselineTrainer(config, workdir, allow_changes=tuple(allow_changes))
    from sfd_jax.ddpm.trainer import Trainer  # heavy imports only once the flags are parsed
    return Trainer(config, workdir, allow_changes=tuple(allow_changes))


def train_and_evaluate(config, workdir: str, *, sigterm_at_step: int | None = None, allow_changes=()):
    """Run (or resume) training in ``workdir``; returns the final state. Everything testable lives below here."""
    return make_trainer(config, workdir, allow_changes=allow_changes).run(sigterm_at_step=sigterm_at_step)


def config_from_flags():
    """``FLAGS.config``, loaded now: a recipe file that does not exist or does not load is a one-line error
    (ml_collections defers that failure from flag parsing to the first access)."""
    path = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), None)
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
        raise UsageError(f"--config={path}: no such recipe file")
    try:
        return FLAGS.config
    except (OSError, ValueError, TypeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise UsageError(f"--config: {lines[-1] if lines else type(e).__name__}") from None


def main(argv):
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = config_from_flags()
    if config is None:
        raise UsageError("--config is required (configs/<recipe>.py)")
    if not FLAGS.workdir:
        raise UsageError("--workdir is required")
    from sfd_jax import parallel
    from sfd_jax.checkpoint import CheckpointSaveError
    parallel.maybe_initialize_distributed()
    trainer = make_trainer(config, FLAGS.workdir, allow_changes=FLAGS.allow_config_change)
    try:
        trainer.run(sigterm_at_step=FLAGS.sigterm_at_step)
    except CheckpointSaveError as e:
        print(f"sfd_jax.train: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)   # Orbax's background threads may still hold the failed save; do not wait for them
    if trainer.stop_signal == "SIGINT":
        sys.exit(130)   # interrupted by Ctrl-C: the step was saved, resume with the same command


def cli():
    run(main, "sfd_jax.train")


if __name__ == "__main__":
    cli()
