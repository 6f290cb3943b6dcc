"""Shared command-line plumbing: one-line errors with a non-zero exit, config loading."""
from __future__ import annotations

import functools
import sys
from typing import Callable

from absl import app
from absl import logging as absl_logging


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from sfd_jax.convert.ddpm import CheckpointMismatchError
    from sfd_jax.convert.torch_pickle import CheckpointFormatError, UnsafeCheckpointError
    return (UsageError, FileNotFoundError, CheckpointMismatchError, CheckpointFormatError, UnsafeCheckpointError)


def run(main: Callable[[list[str]], None], prog: str) -> None:
    """``absl.app.run(main)``, turning user errors into ``prog: error: <message>`` on stderr and exit 2."""
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
    app.run(wrapped)


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
