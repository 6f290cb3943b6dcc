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
