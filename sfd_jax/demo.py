r"""The end-to-end demo: SFD on scikit-learn's 8x8 digits, offline, in minutes on a CPU.

  python -m sfd_jax.demo [--workdir=demo_out] [--forget=0]

Stages (each one is skipped when its outputs are already in ``--workdir``; training resumes from its newest
checkpoint):

  1. teacher     class-conditional DDPM pretraining (``configs/digits_pretrain.py``) -> ``WORKDIR/teacher``
  2. sfd         one-stage SFD from the teacher, forgetting digit K (``configs/digits_sfd.py``, label_to_forget=K)
                 -> ``WORKDIR/sfd_forget<K>``
  3. classifier  the demo's evaluation CNN on the digits train split, held-out accuracy on the test split
                 -> ``WORKDIR/classifier``
  4. samples     ``samples_teacher.npz`` (DDIM with guidance, the teacher config's ``sampling.grid_*``) and
                 ``samples_generator.npz`` (the one-step generator), 100 per class, NHWC uint8 8x8x1 + labels;
                 then ``report.md``, ``report.json`` and the PNG grids ``grid_real.png``, ``grid_teacher.png``,
                 ``grid_generator.png`` (one row per class).

A summary table is printed at the end. ``--fast`` (a testing aid) shrinks every stage to seconds; its numbers
mean nothing.
"""
from __future__ import annotations

from absl import flags

from sfd_jax.cli_utils import UsageError, run

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined by cli(), not at import, so that ``run_demo`` can be imported next to other entry points."""
    flags.DEFINE_string("workdir", "demo_out", "Output directory (stages found there are reused).")
    flags.DEFINE_integer("forget", 0, "The digit (0-9) the distilled generator forgets.")
    flags.DEFINE_bool("fast", False, "Testing aid: shrink every stage to seconds (meaningless numbers).")
    flags.DEFINE_bool("progress", True, "Progress bars for classifier training and sampling.")


def main(argv):
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from sfd_jax.perf import apply_cpu_xla_flags
    apply_cpu_xla_flags()   # before JAX creates its backends (the measured-faster XLA:CPU settings)
    from sfd_jax.ddpm.demo import run_demo
    run_demo(FLAGS.workdir, FLAGS.forget, fast=FLAGS.fast, progress=FLAGS.progress)


def cli():
    _define_flags()
    run(main, "sfd_jax.demo")


if __name__ == "__main__":
    cli()
