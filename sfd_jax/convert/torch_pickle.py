"""Read PyTorch ``.pth`` checkpoints without torch and without running their code.

``load_torch_file`` understands the zip format that ``torch.save`` writes by default
since torch 1.6 (``<top>/data.pkl`` plus one ``<top>/data/<key>`` entry per storage).
The pickle is read by an unpickler whose ``find_class`` only resolves a fixed allowlist
of names to local stand-ins; the real torch functions are never imported or called, and
any other global (``os.system``, ``builtins.eval``, ...) raises ``UnsafeCheckpointError``
at the point it is referenced, before anything from the file is executed.

Every tensor (and ``nn.Parameter``) comes back as a C-contiguous, writeable
``numpy.ndarray`` that owns its data; ``OrderedDict`` stays an ``OrderedDict`` (a
``state_dict()`` keeps its ``_metadata`` attribute), all other containers are the plain
Python types. ``save_torch_file`` writes the reverse direction and needs torch.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import struct
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from sfd_jax.safe_pickle import RestrictedUnpickler

__all__ = [
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "load_torch_file",
    "save_torch_file",
]


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle references a global outside the allowlist."""


class CheckpointFormatError(ValueError):
    """The file is not a readable torch zip checkpoint (legacy, truncated, corrupt)."""


# Legacy (pre-1.6 / ``_use_new_zipfile_serialization=False``) files start with a
# protocol-2 pickle of this magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _BadRecord(Exception):
    """A malformed record inside the pickle; re-raised as CheckpointFormatError naming the file."""


class _Frozen:
    """Base for stand-ins: no ``__dict__`` and no attribute assignment, so a pickle's
    BUILD opcode cannot mutate the shared stand-in objects."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise _BadRecord(f"checkpoint pickle tried to set attribute {name!r} on {self!r}")

    def __delattr__(self, name):
        raise _BadRecord(f"checkpoint pickle tried to delete attribute {name!r} on {self!r}")


class _StorageType(_Frozen):
    """Stand-in for ``torch.<X>Storage``: only carries the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __call__(self, *args, **kwargs):
        raise _BadRecord(f"checkpoint pickle calls torch.{self.name} directly; only storage records are supported")

    def __repr__(self):
        return f"<stand-in torch.{self.name}>"


class _Storage(_Frozen):
    """One storage read from ``<top>/data/<key>``: a flat, read-only numpy array."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        object.__setattr__(self, "array", array)

    def __repr__(self):
        return f"<storage {self.array.dtype} x{self.array.size}>"


class _Callable(_Frozen):
    """Stand-in for an allowlisted function; wraps a local implementation."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn):
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return f"<stand-in {self.qualname}>"


def _as_int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise _BadRecord(f"tensor record has a malformed {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Build a contiguous copy of ``storage[offset + sum(i*stride)]`` of shape ``size``."""
    if not isinstance(storage, _Storage):
        raise _BadRecord(f"tensor record's storage is {type(storage).__name__}, not a storage reference")
    if type(storage_offset) is not int:
        raise _BadRecord(f"tensor record has a malformed storage offset: {storage_offset!r}")
    size = _as_int_tuple(size, "size")
    stride = _as_int_tuple(stride, "stride")
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or storage_offset < 0:
        raise _BadRecord(f"tensor record has invalid size/stride/offset {size}/{stride}/{storage_offset}")
    flat = storage.array
    numel = 1
    for s in size:
        numel *= s
    if numel == 0:
        return np.zeros(size, dtype=flat.dtype)
    last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= flat.size:
        raise _BadRecord(
            f"tensor of size {size}, stride {stride}, offset {storage_offset} reaches element {last} "
            f"of a storage with {flat.size} elements"
        )
    base = flat[storage_offset:]
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(st * item for st in stride), writeable=False
    )
    return np.array(view, dtype=flat.dtype, order="C", copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    """``nn.Parameter`` -> its data array (``state`` of ``_rebuild_parameter_with_state`` is dropped)."""
    if not isinstance(data, np.ndarray):
        raise _BadRecord(f"parameter record wraps {type(data).__name__}, not a tensor")
    return data


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    """Protocol-2 pickles store ``bytes`` as ``_codecs.encode(str, 'latin1')``."""
    if type(obj) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _BadRecord(f"unsupported _codecs.encode call in checkpoint pickle (encoding {encoding!r})")
    return obj.encode("latin1")


# (module, name) -> stand-in object. Only these names are ever resolved.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _Callable("_codecs.encode", _codecs_encode),
    ("torch._utils", "_rebuild_tensor_v2"): _Callable("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Callable("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Callable(
        "torch._utils._rebuild_parameter_with_state", _rebuild_parameter
    ),
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


def _refusal(display_name: str):
    """The error factory for :class:`RestrictedUnpickler`: a refused global names the file and the global."""
    def error(what: str) -> Exception:
        if what.startswith("global "):
            return UnsafeCheckpointError(
                f"refusing to load {display_name}: its pickle references {what[len('global '):]}, which is not a "
                "tensor rebuild or a plain container (loading a checkpoint never runs code from it)")
        return CheckpointFormatError(f"{display_name}: unsupported record in the pickle: {what}")
    return error


def _SafeUnpickler(file, display_name: str, read_storage=None, *, persistent_load=None, allowed=None,
                   fallback=None) -> RestrictedUnpickler:
    """The restricted unpickler over ``_ALLOWED`` (or ``allowed``); storages of the zip format via
    ``read_storage(key, dtype, numel)``, or any ``persistent_load`` handler."""
    if persistent_load is None and read_storage is not None:
        def persistent_load(pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise CheckpointFormatError(f"{display_name}: unsupported persistent record {pid!r:.200}")
            _, storage_type, key, _location, numel = pid
            if not isinstance(storage_type, _StorageType) or type(key) is not str or type(numel) is not int \
                    or numel < 0:
                raise CheckpointFormatError(f"{display_name}: malformed storage record {pid!r:.200}")
            return read_storage(key, storage_type.dtype, numel)
    return RestrictedUnpickler(file, _ALLOWED if allowed is None else allowed, _refusal(display_name),
                               persistent_load=persistent_load, fallback=fallback)


_CORRUPT = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError, KeyError,
            IndexError, OverflowError, MemoryError, RecursionError, struct.error)


def load_torch_file(path, *, allowed=None, fallback=None) -> Any:
    """Load a ``torch.save`` zip checkpoint; tensors become numpy arrays.

    Raises ``UnsafeCheckpointError`` if the pickle references anything but tensor
    rebuilds and plain containers, ``CheckpointFormatError`` if the file is not a
    torch zip checkpoint (legacy pre-1.6 format, truncated, missing ``data.pkl``).
    OrderedDicts are returned as ``collections.OrderedDict``. ``allowed`` replaces the global allowlist
    and ``fallback`` may return inert objects for other globals (see :class:`RestrictedUnpickler`).
    """
    display = os.path.basename(os.fspath(path)) or os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head.startswith(_LEGACY_MAGIC):
        raise CheckpointFormatError(
            f"{display} uses the legacy (pre-1.6, _use_new_zipfile_serialization=False) torch.save format; "
            "re-save it with a current torch: torch.save(torch.load(p), p)"
        )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointFormatError(f"{display} is not a torch zip checkpoint ({e})") from None
    with zf:
        names = zf.namelist()
        pkls = sorted((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), key=lambda n: (n.count("/"), n))
        if not pkls:
            raise CheckpointFormatError(f"{display} is a zip file but has no data.pkl entry (not a torch checkpoint)")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"{display}: unknown byteorder {byteorder!r}")
        swap = byteorder != sys.byteorder
        cache: dict[str, np.ndarray] = {}

        def read_storage(key: str, dtype: np.dtype, numel: int) -> _Storage:
            arr = cache.get(key)
            if arr is None:
                entry = f"{prefix}data/{key}"
                try:
                    raw = zf.read(entry)
                except KeyError:
                    raise CheckpointFormatError(f"{display}: storage entry {entry!r} is missing") from None
                nbytes = numel * dtype.itemsize
                if len(raw) < nbytes:
                    raise CheckpointFormatError(
                        f"{display}: storage {entry!r} has {len(raw)} bytes, expected {nbytes} (truncated file?)"
                    )
                arr = np.frombuffer(raw, dtype=dtype, count=numel)
                if swap and dtype.itemsize > 1:
                    uint = np.dtype(f"u{dtype.itemsize}")
                    arr = arr.view(uint).byteswap().view(dtype)
                arr.flags.writeable = False
                cache[key] = arr
            elif arr.dtype != dtype:
                raise CheckpointFormatError(f"{display}: storage {key!r} is referenced with dtypes {arr.dtype} and {dtype}")
            return _Storage(arr)

        try:
            with _format_errors(display, "checkpoint pickle"):
                data = zf.read(pkls[0])
                return _SafeUnpickler(io.BytesIO(data), display, read_storage, allowed=allowed,
                                      fallback=fallback).load()
        finally:
            cache.clear()


_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


@contextlib.contextmanager
def _format_errors(display: str, what: str):
    """Our own errors pass; a bad record or any parsing failure becomes a one-line CheckpointFormatError."""
    try:
        yield
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except _BadRecord as e:
        raise CheckpointFormatError(f"{display}: {e}") from None
    except _CORRUPT as e:
        raise CheckpointFormatError(f"{display}: corrupt {what} ({type(e).__name__}: {e})") from None


def load_legacy_torch(blob: bytes, display: str, *, allowed=None) -> Any:
    """Read a legacy (pre-1.6, non-zip) ``torch.save`` file's bytes without running code from it.

    Layout: pickles of the magic number, the protocol version and sys_info, then the object pickle whose
    storages are persistent records ('storage', type, key, location, numel, view_metadata), then a pickle of
    the storage keys, then each storage as int64 element count + raw bytes. The magic and protocol records are
    read with an empty allowlist, the rest over ``_ALLOWED`` (or ``allowed``). The object pickle is read
    twice: once with empty storages to find where it ends, once with the data.
    """
    f = io.BytesIO(blob)
    allowed = _ALLOWED if allowed is None else allowed
    records: dict[str, tuple[np.dtype, int]] = {}

    def storage_loader(storages):
        def persistent_load(pid):
            if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
                raise CheckpointFormatError(f"{display}: unsupported persistent record {pid!r:.200}")
            _, stype, key, _loc, numel, view = pid
            if not isinstance(stype, _StorageType) or type(key) is not str or type(numel) is not int \
                    or numel < 0 or view is not None:
                raise CheckpointFormatError(f"{display}: unsupported storage record {pid!r:.200}")
            records[key] = (stype.dtype, numel)
            if storages is None:
                return _Storage(np.zeros(numel, stype.dtype))
            return _Storage(storages[key])
        return persistent_load

    with _format_errors(display, "legacy checkpoint"):
            magic = RestrictedUnpickler(f, {}, _refusal(display)).load()
            if type(magic) is not int or magic != _LEGACY_MAGIC_NUMBER:
                raise CheckpointFormatError(f"{display} is not a torch checkpoint")
            protocol = RestrictedUnpickler(f, {}, _refusal(display)).load()
            if type(protocol) is not int:
                raise CheckpointFormatError(f"{display}: malformed legacy protocol record")
            sys_info = _SafeUnpickler(f, display, allowed=allowed).load()
            little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
            body_start = f.tell()
            _SafeUnpickler(f, display, persistent_load=storage_loader(None), allowed=allowed).load()
            keys = _SafeUnpickler(f, display, allowed=allowed).load()
            if not isinstance(keys, list) or not all(type(k) is str and k in records for k in keys):
                raise CheckpointFormatError(f"{display}: malformed storage key list")
            storages = {}
            for key in keys:
                dtype, numel = records[key]
                (n,) = struct.unpack("<q" if little else ">q", f.read(8))
                raw = f.read(n * dtype.itemsize)
                if n != numel or len(raw) != n * dtype.itemsize:
                    raise CheckpointFormatError(f"{display}: storage {key} is truncated or has the wrong size")
                arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<" if little else ">")).astype(dtype)
                arr.flags.writeable = False
                storages[key] = arr
            f.seek(body_start)
            return _SafeUnpickler(f, display, persistent_load=storage_loader(storages), allowed=allowed).load()


def is_legacy_torch_file(path) -> bool:
    """True when ``path`` starts with the legacy ``torch.save`` magic-number pickle."""
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_MAGIC)).startswith(_LEGACY_MAGIC)


def _to_torch(obj, torch, jax_array_type):
    if isinstance(obj, torch.Tensor):
        return obj
    if jax_array_type is not None and isinstance(obj, jax_array_type):
        obj = np.asarray(obj)
    if isinstance(obj, (np.ndarray, np.generic)):
        arr = np.array(obj, order="C", copy=True)
        if arr.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
        try:
            return torch.from_numpy(arr)
        except TypeError as e:
            raise TypeError(f"cannot write a numpy array of dtype {arr.dtype} to a .pth file: {e}") from None
    if isinstance(obj, dict):
        out = {k: _to_torch(v, torch, jax_array_type) for k, v in obj.items()}
        if type(obj) is dict:
            return out
        new = type(obj)(out)  # OrderedDict and friends keep their type and order
        if hasattr(obj, "__dict__"):
            new.__dict__.update(obj.__dict__)  # e.g. state_dict()._metadata
        return new
    if isinstance(obj, list):
        return [_to_torch(v, torch, jax_array_type) for v in obj]
    if isinstance(obj, tuple):
        items = [_to_torch(v, torch, jax_array_type) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def save_torch_file(obj, path) -> None:
    """``torch.save`` ``obj`` after turning numpy/jax arrays (nested in dict/list/tuple)
    into torch tensors; numpy scalars become 0-d tensors, bfloat16 -> torch.bfloat16."""
    try:
        import torch
    except ImportError:
        raise ImportError("writing .pth files needs PyTorch: pip install torch") from None
    jax = sys.modules.get("jax")
    jax_array_type = getattr(jax, "Array", None) if jax is not None else None
    torch.save(_to_torch(obj, torch, jax_array_type), path)
