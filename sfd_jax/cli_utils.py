"""Shared command-line plumbing: one-line errors with a non-zero exit, up-front checks of inputs and outputs, the
flags several commands share (defined once here, listed by each command's ``--help``)."""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Callable

from absl import app
from absl import logging as absl_logging


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from sfd_jax.convert.ddpm import CheckpointMismatchError
    from sfd_jax.convert.torch_pickle import CheckpointFormatError, UnsafeCheckpointError
    from sfd_jax.data.formats import DatasetError
    return (UsageError, FileNotFoundError, CheckpointMismatchError, CheckpointFormatError, UnsafeCheckpointError,
            DatasetError)


_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def _asked_for_help(argv: list[str]) -> bool:
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    return any(a in _HELP_FLAGS or a.split("=", 1)[0] in _HELP_FLAGS[2:] for a in args)


def _flag_error_line(e: BaseException, argv: list[str]) -> str:
    """One line for a flag that does not parse: an unknown ``--config.x.y`` key keeps ml_collections'
    'Did you mean ...'; a recipe file that is missing or does not load says so."""
    import re
    text = str(e)
    if isinstance(e, (AttributeError, KeyError)):
        text = text.encode().decode("unicode_escape")
        hint = re.search(r'Did you mean "[^"]+" instead of "([^"]+)"\?', text)
        quoted = re.search(r"'([^'\s]+)'", text)
        key = hint.group(1) if hint else quoted.group(1) if quoted else text.strip().splitlines()[0]
        given = next((a.split("=", 1)[0] for a in argv[1:]
                      if a.startswith("--") and f".{key}." in a.split("=", 1)[0] + "."), key)
        hint = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', text)
        return f"{given}: no such key in the recipe" + (f"; {hint.group(0)}" if hint else "")
    if isinstance(e, SyntaxError):
        return f"{e.filename}:{e.lineno}: {e.msg} (the recipe file does not load)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ({lines[-1]})"


def _parse_flags(prog: str, argv: list[str]) -> list[str]:
    """absl's flag parsing with every failure (absl's own, ml_collections' config overrides and recipe loading)
    reported as ``prog: error: <one line>`` and exit 2."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    except (AttributeError, KeyError, OSError, ValueError, TypeError, SyntaxError) as e:
        msg = _flag_error_line(e, argv)
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[list[str]], None], prog: str) -> None:
    """``absl.app.run(main)``, turning user errors into ``prog: error: <message>`` on stderr and exit 2. First
    appends the measured-faster XLA:CPU settings to ``XLA_FLAGS`` (:func:`sfd_jax.perf.apply_cpu_xla_flags`: before
    JAX creates its backends; GPU/TPU ignore them; ``SFD_JAX_NO_CPU_FLAGS=1`` opts out)."""
    from sfd_jax.perf import apply_cpu_xla_flags
    apply_cpu_xla_flags()

    @functools.wraps(main)
    def wrapped(argv):
        if absl_logging.get_verbosity() <= absl_logging.INFO and "--verbosity" not in " ".join(sys.argv):
            absl_logging.set_verbosity(absl_logging.WARNING)  # keep library INFO logs off the terminal
        try:
            return main(argv)
        except _user_errors() as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"{prog}: error: {msg}", file=sys.stderr)
            sys.exit(2)
    try:
        app.run(wrapped, flags_parser=functools.partial(_parse_flags, prog))
    except SystemExit as e:
        # absl exits 1 after printing the usage for --help; asking for help is not an error.
        if e.code == 1 and _asked_for_help(sys.argv):
            sys.exit(0)
        raise


def check_positive(**values: int | None) -> None:
    """UsageError naming the first ``--flag`` (keyword name) whose value is given and below 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_path(path: str, what: str, *, directory: bool = False) -> str:
    """Refuse, before any work, an output that cannot be written; nothing is created.

    ``directory=False``: ``path`` is a file to write (must not be a directory); ``True``: a directory to fill
    (must not be a file). Either way the nearest existing ancestor must be a writable directory (missing
    folders in between are created later by the writer). Raises UsageError naming ``what`` (e.g. '--out').
    """
    if not path:
        raise UsageError(f"{what} is empty")
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path} exists and is not a directory")
    if not directory and os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory; expected a file name")
    start = path if directory else os.path.dirname(os.path.abspath(path))
    anc = _nearest_existing(start)
    if not os.path.isdir(anc):
        raise UsageError(f"{what} {path} cannot be created: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} cannot be created: {anc} is not writable")
    return path


def check_input_file(path: str, what: str) -> str:
    """FileNotFoundError / UsageError, before any work, unless ``path`` is a readable file."""
    check_input_path(path, what)
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory; expected a file")
    return path


def check_input_path(path: str, what: str) -> str:
    """FileNotFoundError / UsageError, before any work, unless ``path`` is a readable file or directory."""
    if not path:
        raise UsageError(f"{what} is empty")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path} is not readable")
    return path


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of integers, got {text!r}") from None


def parse_classes(text: str, n_classes: int) -> list[int]:
    """'0,3' -> [0, 3]; 'x0,x3' -> every class but 0 and 3 (the original's form); '' -> all.

    Raises UsageError on bad input or a class outside [0, n_classes)."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        return list(range(n_classes))
    excluded = [v.startswith("x") for v in items]
    if any(excluded) and not all(excluded):
        raise UsageError(f"--classes mixes included and excluded ('x') classes: {text!r}")
    values = parse_int_list(",".join(v.lstrip("x") for v in items), "--classes")
    bad = [v for v in values if not 0 <= v < n_classes]
    if bad:
        raise UsageError(f"--classes: class {bad[0]} is outside [0, {n_classes})")
    return [c for c in range(n_classes) if c not in values] if all(excluded) else values


def write_json(path: str | None, obj: dict) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` (parent folders created); nothing when ``path`` is
    empty."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


# -------------------------------------------------------------------------------------- shared flag definitions
def _shared_flag(define: Callable, name: str, *args, **kwargs) -> None:
    """``define(name, *args)`` unless ``--name`` exists, and list it in the running command's ``--help`` (absl
    lists the key flags of the main module, ``sys.argv[0]``; a flag defined here would otherwise be this module's)."""
    from absl import flags
    if name not in flags.FLAGS:
        define(name, *args, **kwargs)
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def define_progress_flag() -> None:
    from absl import flags
    _shared_flag(flags.DEFINE_bool, "progress", True, "Show progress bars.")


def define_seed_flag(help_text: str = "Random seed.", default: int = 1234) -> None:
    from absl import flags
    _shared_flag(flags.DEFINE_integer, "seed", default, help_text)


def define_recipe_config_flag(help_text: str) -> None:
    """``--config=configs/<recipe>.py`` with ``--config.x.y=...`` overrides (unlocked)."""
    from ml_collections import config_flags
    _shared_flag(config_flags.DEFINE_config_file, "config", None, help_text, lock_config=False)


def define_ddpm_sampling_flags() -> None:
    """The flags of :class:`sfd_jax.ddpm.sampling.CheckpointSampler` (read back by :func:`ddpm_sampling_settings`):
    --checkpoint's network (--weights) and how it is sampled (--sampler, --steps, --eta, --skip, --cond_scale)."""
    from absl import flags
    _shared_flag(flags.DEFINE_string, "sampler", "auto",
                 "one_step | ddim | ddpm | auto (one_step for distilled checkpoints, else ddim).")
    _shared_flag(flags.DEFINE_integer, "steps", 100,
                 "Sampling steps for ddim/ddpm (the original's --timesteps, default 1000 there).")
    _shared_flag(flags.DEFINE_float, "eta", 0.0, "DDIM stochasticity (0: deterministic DDIM; 1: the original's "
                 "default).")
    _shared_flag(flags.DEFINE_string, "skip", "uniform", "Timestep spacing for ddim/ddpm: uniform | quad.")
    _shared_flag(flags.DEFINE_float, "cond_scale", 0.0,
                 "Guidance s: eps = (1+s)*cond - s*uncond (0: none; the original's default is 2).")
    _shared_flag(flags.DEFINE_string, "weights", "ema", "ema | raw: the EMA or raw weights of the generator (or "
                 "model).")


def ddpm_sampling_settings() -> dict:
    """Keyword arguments of :class:`sfd_jax.ddpm.sampling.CheckpointSampler` from the flags of
    :func:`define_ddpm_sampling_flags` and ``--config``."""
    from absl import flags
    f = flags.FLAGS
    return dict(config=f.config, weights=f.weights, sampler=f.sampler, steps=f.steps, skip=f.skip, eta=f.eta,
                cond_scale=f.cond_scale)
