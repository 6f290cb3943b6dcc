r"""The end-to-end demo: SFD on scikit-learn's 8x8 digits, offline, in minutes on a CPU.

  python -m sfd_jax.demo [--workdir=demo_out] [--forget=0]
  python -m sfd_jax.demo --forget=2,5,7 [--override=1 | --override=1,4,1]   # several digits in one run
  python -m sfd_jax.demo --methods=sfd,retrain,sa,salun,esd [--forget=0]   # the leaderboard (sfd_jax.ddpm.leaderboard)
  python -m sfd_jax.demo --task=sd [--data=NPZ --class_names=FILE --templates=FILE] [--forget=NAME --override=NAME]
      # text-to-image: a world trained here, its one-step student, SFD forgetting a concept (sfd_jax.sd.demo);
      # --forget=zero,seven --override=one,one forgets several concepts in one run (a forget table)

Stages (each one is skipped when its outputs are already in ``--workdir``; training resumes from its newest
checkpoint):

  1. teacher     class-conditional DDPM pretraining (``configs/digits_pretrain.py``) -> ``WORKDIR/teacher``
  2. sfd         one-stage SFD from the teacher, forgetting digit K (``configs/digits_sfd.py``, label_to_forget=K)
                 -> ``WORKDIR/sfd_forget<K>``; several digits -> ``WORKDIR/sfd_forget2-5-7`` and the run's own
                 ``report_forget2-5-7.{json,md}``, ``samples_generator_forget2-5-7.npz``, grid (ddpm/demo.run_names)
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
    flags.DEFINE_string("forget", None, "The digit (0-9, default 0) the distilled generator forgets, or several "
                        "separated by commas (2,5,7) forgotten in one run; with --task=sd the concept's class name "
                        "(default: the first class), or several (zero,seven).")
    flags.DEFINE_enum("task", "ddpm", ["ddpm", "sd"], "ddpm: class-conditional digits; sd: text-to-image world.")
    flags.DEFINE_string("data", "digits", "--task=sd: digits | fashion_mnist | an npz (images NHWC uint8, labels).")
    flags.DEFINE_string("class_names", None, "--task=sd: class-names file, one per line (default: built-in/npz).")
    flags.DEFINE_string("templates", None, "--task=sd: caption templates with {name}, one per line.")
    flags.DEFINE_string("override", None, "The override digit (default: the recipe's, 1), one for all forgotten "
                        "digits or one per digit (1,4,1); --task=sd: the override concept (default: the class after "
                        "--forget), one for all or one per forgotten concept.")
    flags.DEFINE_bool("fast", False, "Testing aid: shrink every stage to seconds (meaningless numbers).")
    flags.DEFINE_bool("progress", True, "Progress bars for classifier training and sampling.")
    flags.DEFINE_string("methods", "", "Leaderboard: comma-separated methods among sfd,retrain,sa,salun,esd, run on one "
                        "teacher and one classifier (sfd_jax.ddpm.leaderboard); empty: the SFD demo alone.")
    flags.DEFINE_string("attacks", "", "Leaderboard (with --methods): robustness attacks among latent,relearn on every "
                        "method, judged by an independent classifier (sfd_jax.ddpm.leaderboard_attacks); with "
                        "--task=sd: inversion,prompt after the report (sfd_jax.sd.demo_attacks).")
    flags.register_multi_flags_validator(["attacks", "methods", "task"],
                                         lambda f: not f["attacks"] or bool(f["methods"]) or f["task"] == "sd",
                                         message="--attacks needs --methods (the attacks run on the leaderboard) or "
                                         "--task=sd")


def main(argv):
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.task == "sd":
        from sfd_jax.sd.demo import run_sd_demo
        from sfd_jax.sd.demo_attacks import parse_kinds, run_sd_attacks
        kinds = parse_kinds(FLAGS.attacks) if FLAGS.attacks else ()   # a bad kind: one line before any stage
        if kinds and FLAGS.forget is not None and "," in FLAGS.forget:
            raise UsageError("--attacks attacks one forgotten concept; run several concepts (--forget=a,b) "
                             "without --attacks")
        run_sd_demo(FLAGS.workdir if FLAGS["workdir"].present else "demo_sd", data=FLAGS.data,
                    class_names=FLAGS.class_names, templates=FLAGS.templates, forget=FLAGS.forget,
                    override=FLAGS.override, fast=FLAGS.fast)
        if kinds:
            run_sd_attacks(FLAGS.workdir if FLAGS["workdir"].present else "demo_sd", kinds, data=FLAGS.data,
                           class_names=FLAGS.class_names, templates=FLAGS.templates, fast=FLAGS.fast,
                           progress=FLAGS.progress)
        return
    forget = (0,) if FLAGS.forget is None else parse_digits(FLAGS.forget, "--forget")
    override = None if FLAGS.override is None else parse_digits(FLAGS.override, "--override")
    from sfd_jax.ddpm.demo import check_digits, run_demo
    check_digits(forget, override)   # one line for a repeated digit, an override count or an override forgotten
    if FLAGS.methods:
        if len(forget) > 1 or override is not None:
            raise UsageError("--methods (the leaderboard) forgets one digit with the recipes' override; several "
                             "digits (--forget=2,5,7) and --override run the SFD demo alone (no --methods)")
        from sfd_jax.ddpm.leaderboard import parse_methods, run_leaderboard
        run_leaderboard(FLAGS.workdir, forget[0], parse_methods(FLAGS.methods), fast=FLAGS.fast,
                        progress=FLAGS.progress, attacks=FLAGS.attacks)
    else:
        run_demo(FLAGS.workdir, forget if len(forget) > 1 else forget[0], override=override, fast=FLAGS.fast,
                 progress=FLAGS.progress)


def parse_digits(text: str, flag: str) -> tuple[int, ...]:
    """'3' -> (3,), '2,5,7' -> (2, 5, 7); anything but digits 0..9 separated by commas is a one-line UsageError."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p.isdigit() or not 0 <= int(p) <= 9 for p in parts):
        raise UsageError(f"{flag} must be a digit 0..9, got {text}" if len(parts) == 1 else
                         f"{flag} must be digits 0..9 separated by commas, got {text!r}")
    return tuple(int(p) for p in parts)


def cli():
    _define_flags()
    run(main, "sfd_jax.demo")


if __name__ == "__main__":
    cli()
