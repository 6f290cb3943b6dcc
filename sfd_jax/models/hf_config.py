"""Strict reading of diffusers/transformers ``config.json`` files into our module fields.

Every key of a config is accounted for: a key we implement becomes a module field; a key whose value changes an
architecture feature we do not implement must hold the value that switches that feature off (else an error names
it); keys that describe no computation (bookkeeping, sizes used only by other tools) are listed explicitly.
Anything else is an unknown key, and an error as well. Keys starting with ``_`` are the libraries' bookkeeping.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from sfd_jax.cli_utils import UsageError


class UnsupportedConfigError(UsageError, ValueError):
    """A config.json asks for something sfd_jax's modules do not implement."""


_MISSING = object()


def parse_config(config: Mapping[str, Any], *, what: str, fields: Mapping[str, str],
                 off_values: Mapping[str, tuple], informational: Iterable[str] = ()) -> dict:
    """Map a config dict to module keyword arguments.

    fields: config key -> module field name (implemented keys).
    off_values: config key -> the values that mean "feature off" (accepted and then ignored).
    informational: keys that do not change the computation (accepted and ignored).
    what: the file, for messages (``'unet/config.json'``).
    """
    informational = set(informational)
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in fields:
            kwargs[fields[key]] = tuple(value) if isinstance(value, list) else value
        elif key in off_values:
            allowed = off_values[key]
            if value not in allowed and not (isinstance(value, list) and tuple(value) in allowed):
                raise UnsupportedConfigError(
                    f"{what}: unsupported config key {key!r} = {value!r} "
                    f"(sfd_jax implements only {' or '.join(repr(a) for a in allowed)})")
        elif key not in informational:
            raise UnsupportedConfigError(f"{what}: unknown config key {key!r} = {value!r} (not implemented by sfd_jax)")
    return kwargs
