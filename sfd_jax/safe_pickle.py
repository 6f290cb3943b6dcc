"""The one restricted unpickler every pickle read in this package goes through.

:class:`RestrictedUnpickler` resolves a global only through an explicit allowlist ``{(module, name): object}``
(the objects are the caller's own stand-ins or vetted functions; the module named in the pickle is never
imported) or an optional ``fallback(module, name)`` that returns an inert object (or None to refuse). Every other
global, and every persistent id unless a handler is given, raises the caller's error before anything from the
file runs. Without a global the pickle has nothing to call: REDUCE, NEWOBJ, BUILD and the extension opcodes all
need an object that ``find_class`` handed out.

Callers: ``convert.torch_pickle`` (torch zip and legacy files; tensor rebuilds only), ``data.formats`` (numpy-array
pickles of the CIFAR-10 batches), ``eval.inception`` (the legacy file's magic number and protocol records, with an
empty allowlist) and ``convert.sd_checkpoints`` (SiD-LSG pickles: module classes become inert stubs).
"""
from __future__ import annotations

import _compat_pickle
import io
import pickle
from typing import Any, Callable, Mapping

__all__ = ["RestrictedUnpickler", "loads"]

ErrorFactory = Callable[[str], BaseException]


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only ``allowed`` globals (then ``fallback``'s inert objects).

    ``error(what)`` builds the exception raised for a refused global (``what`` = "global 'os.system'") or a
    persistent id (``what`` = "a persistent id ...") when no ``persistent_load`` handler is given.
    Python 2 names (``__builtin__.set``, protocol <= 2) are mapped as pickle's ``fix_imports`` does.
    """

    def __init__(self, file, allowed: Mapping[tuple[str, str], Any], error: ErrorFactory, *,
                 persistent_load: Callable[[Any], Any] | None = None,
                 fallback: Callable[[str, str], Any] | None = None, encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)
        self._allowed = allowed
        self._error = error
        self._persistent = persistent_load
        self._fallback = fallback

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            pass
        if self._fallback is not None and type(module) is str and type(name) is str:
            obj = self._fallback(module, name)
            if obj is not None:
                return obj
        raise self._error(f"global {f'{module}.{name}'!r}")

    def persistent_load(self, pid):
        if self._persistent is None:
            raise self._error(f"a persistent id ({pid!r:.80})")
        return self._persistent(pid)


def loads(data: bytes, allowed: Mapping[tuple[str, str], Any], error: ErrorFactory, **kw) -> Any:
    """One object from ``data`` via :class:`RestrictedUnpickler` (keyword arguments as its constructor's)."""
    return RestrictedUnpickler(io.BytesIO(data), allowed, error, **kw).load()
