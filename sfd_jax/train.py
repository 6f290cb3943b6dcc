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

# The original's comparison methods (sfd_jax.ddpm.baselines; README: "The original release and our differences" ›
# Baselines) are modes too.
BASELINE_MODES = ("retrain", "sa_fim", "sa", "salun_mask", "salun", "esd")
MODES = ("pretrain", "sfd", "sd_sfd", "sd_pretrain") + BASELINE_MODES


def validate_config(config) -> None:
    """Fail early, with one line, on a mode that does not exist. Each mode's own settings are checked once, by its
    trainer's constructor, before anything is built or written."""
    if config.get("mode") not in MODES:
        raise UsageError(f"config.mode must be one of {', '.join(MODES)}, got {config.get('mode')!r}")


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
