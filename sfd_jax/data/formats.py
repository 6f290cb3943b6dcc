"""File readers for the image datasets: CIFAR-10 python batches, STL-10 binaries, idx (MNIST/Fashion-MNIST),
scikit-learn digits and ``.npz`` files.

Every reader returns ``(images, labels, class_names)`` with ``images`` uint8 [N, H, W, C] (NHWC, values 0..255),
``labels`` int64 [N] and ``class_names`` a tuple of str or None. Nothing here resizes or changes channels; that is
``images.load_dataset``'s job. Failures raise :class:`DatasetError`, one line naming the file and what was
expected.
"""
from __future__ import annotations

import gzip
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from sfd_jax import safe_pickle

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or not in the expected format (one-line message)."""


# ----------------------------------------------------------------------------------------------------------------
# Safe unpickling of numpy-array pickles (CIFAR-10 python batches)

def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray as _ma, numeric as _nu   # numpy >= 2
    except ImportError:                                             # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma, numeric as _nu
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,   # how protocol-2 pickles from Python 3 store bytes
    }
    # Python 2 / numpy 1 pickles name numpy.core.multiarray; numpy 2 writes numpy._core.multiarray. Both map to
    # the object we imported ourselves: the module path in the pickle is never imported.
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _ma._reconstruct
        allowed[(mod, "scalar")] = _ma.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):   # protocol 5 (frombuffer; object dtypes refused)
        allowed[(mod, "_frombuffer")] = _nu._frombuffer
    return allowed


_NUMPY_GLOBALS = _allowed_globals()


def _refusal(source: str):
    def error(what: str) -> DatasetError:
        return DatasetError(f"{source}: refusing to unpickle {what} (only numpy arrays, dicts, lists and strings "
                            "are allowed in dataset pickles)")
    return error


def safe_unpickle(data: bytes, source: str):
    """Load a pickle of plain containers and numpy arrays without executing code (no arbitrary globals).

    Read by :class:`sfd_jax.safe_pickle.RestrictedUnpickler` over the numpy globals (latin1: Python 2 str
    payloads of numpy arrays, as torchvision reads them)."""
    try:
        return safe_pickle.loads(data, _NUMPY_GLOBALS, _refusal(source), encoding="latin1")
    except DatasetError:
        raise
    except Exception as e:   # truncated or corrupt pickle
        raise DatasetError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None


def _str_keys(d, source: str) -> dict:
    if not isinstance(d, dict):
        raise DatasetError(f"{source}: expected a pickled dict, got {type(d).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10 (python version)

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)
_CIFAR_EXPECT = ("data_batch_1..5, test_batch, batches.meta in the directory or its 'cifar-10-batches-py/', "
                 "or cifar-10-python.tar.gz")


def _cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    d = _str_keys(safe_unpickle(raw, source), source)
    if "data" not in d or "labels" not in d:
        raise DatasetError(f"{source}: expected a CIFAR-10 batch dict with 'data' and 'labels', got keys "
                           f"{sorted(map(str, d))}")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
        raise DatasetError(f"{source}: expected 'data' uint8 [N, 3072] matching {len(labels)} labels, got "
                           f"{data.dtype} {list(data.shape)}")
    # Each row holds the red, green then blue 32x32 planes, each row-major: CHW -> HWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _cifar_names(raw: bytes | None, source: str) -> tuple[str, ...]:
    if raw is None:
        return CIFAR10_CLASSES
    d = _str_keys(safe_unpickle(raw, source), source)
    names = d.get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DatasetError(f"{source}: expected 'label_names', a list of 10 class names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _cifar_from_tar(tar_path: Path, files: tuple[str, ...]):
    try:
        tf = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"{tar_path}: not a readable tar archive ({e})") from None
    with tf:
        wanted = set(files) | {"batches.meta"}
        members = {}
        for m in tf:                          # one pass over the (compressed) stream; nothing written to disk
            base = os.path.basename(m.name)
            if m.isfile() and base in wanted and base not in members:
                members[base] = tf.extractfile(m).read()
        missing = [f for f in files if f not in members]
        if missing:
            raise DatasetError(f"{tar_path}: archive lacks CIFAR-10 member(s) {', '.join(missing)} "
                               f"(expected cifar-10-batches-py/{{data_batch_1..5,test_batch,batches.meta}})")
        parts = [_cifar_batch(members[f], f"{tar_path}:{f}") for f in files]
        names = _cifar_names(members.get("batches.meta"), f"{tar_path}:batches.meta")
    return parts, names


def read_cifar10(path: str | os.PathLike, part: str):
    """CIFAR-10 python batches: part 'train' (data_batch_1..5, 50,000 images) or 'test' (test_batch, 10,000).

    ``path`` is a directory holding the batch files (or their 'cifar-10-batches-py/' folder, as torchvision
    leaves it), or the original ``cifar-10-python.tar.gz`` (members are read from the archive, not extracted).
    Pickles are loaded by a restricted unpickler that only builds numpy arrays (no code is executed).
    Returns images uint8 [N, 32, 32, 3], labels int64 [N], the 10 class names.
    """
    files = CIFAR_TRAIN_FILES if part == "train" else CIFAR_TEST_FILES
    p = Path(path)
    if p.is_file():
        parts, names = _cifar_from_tar(p, files)
    else:
        candidates = [p, p / "cifar-10-batches-py"]
        root = next((c for c in candidates if all((c / f).is_file() for f in files)), None)
        if root is None:
            tar = p / "cifar-10-python.tar.gz"
            if not tar.is_file():
                raise DatasetError(f"{p}: no CIFAR-10 '{part}' batches found (expected {_CIFAR_EXPECT})")
            parts, names = _cifar_from_tar(tar, files)
        else:
            parts = [_cifar_batch((root / f).read_bytes(), str(root / f)) for f in files]
            meta = root / "batches.meta"
            names = _cifar_names(meta.read_bytes() if meta.is_file() else None, str(meta))
    images = np.concatenate([im for im, _ in parts])
    labels = np.concatenate([lb for _, lb in parts])
    _check_labels(labels, 10, str(p))
    return images, labels, names


# ----------------------------------------------------------------------------------------------------------------
# STL-10 (binary version)

def read_stl10(path: str | os.PathLike, part: str):
    """STL-10 binaries: part 'train' (train_X.bin/train_y.bin, 5,000) or 'test' (test_X.bin/test_y.bin, 8,000).

    ``path`` is the directory with the .bin files or its 'stl10_binary/' folder. Each image is stored as three
    96x96 planes, each column-major; labels 1..10 in the file become 0..9. Returns images uint8 [N, 96, 96, 3],
    labels int64 [N], class names (from class_names.txt when present).
    """
    p = Path(path)
    xf, yf = f"{part}_X.bin", f"{part}_y.bin"
    root = next((c for c in (p, p / "stl10_binary") if (c / xf).is_file() and (c / yf).is_file()), None)
    if root is None:
        raise DatasetError(f"{p}: no STL-10 '{part}' files found (expected {xf} and {yf} in the directory or "
                           f"its 'stl10_binary/')")
    x = np.fromfile(root / xf, dtype=np.uint8)
    y = np.fromfile(root / yf, dtype=np.uint8).astype(np.int64)
    per = 3 * 96 * 96
    if x.size % per or x.size // per != y.size:
        raise DatasetError(f"{root / xf}: expected {y.size} images of 3x96x96 bytes to match {yf}, got {x.size} "
                           f"bytes")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DatasetError(f"{root / yf}: expected labels 1..10, found {y.min()}..{y.max()}")
    # File order per image is [C][W][H] (column-major planes) -> [H][W][C].
    images = np.ascontiguousarray(x.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1))
    names = STL10_CLASSES
    cn = root / "class_names.txt"
    if cn.is_file():
        lines = [ln.strip() for ln in cn.read_text().splitlines() if ln.strip()]
        if len(lines) == 10:
            names = tuple(lines)
    return images, y - 1, names


# ----------------------------------------------------------------------------------------------------------------
# idx files (MNIST, Fashion-MNIST)

_IDX_SUBDIRS = {"mnist": ("MNIST/raw",), "fashion_mnist": ("FashionMNIST/raw", "fashion-mnist")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One idx file (raw or .gz) of unsigned bytes -> uint8 array of the shape in its header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read idx file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: not an idx file (expected magic 0x0000<type><ndim>)")
    if raw[2] != 0x08:
        raise DatasetError(f"{path}: idx data type 0x{raw[2]:02x} unsupported (expected 0x08, unsigned byte)")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says shape {list(shape)} ({int(np.prod(shape))} bytes), file holds "
                           f"{len(raw) - start} data bytes")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(shape)


def _find_idx(roots, stem: str) -> Path | None:
    for r in roots:
        for name in (stem, stem + ".gz"):
            if (r / name).is_file():
                return r / name
    return None


def read_idx_dataset(path: str | os.PathLike, part: str, kind: str = "mnist"):
    """MNIST-style idx files: part 'train' (train-images-idx3-ubyte, train-labels-idx1-ubyte) or 'test' (t10k-*),
    raw or gzipped, in ``path`` or torchvision's 'MNIST/raw' / 'FashionMNIST/raw' below it.

    Returns images uint8 [N, 28, 28, 1], labels int64 [N], class names.
    """
    p = Path(path)
    roots = [p] + [p / s for s in _IDX_SUBDIRS.get(kind, ())]
    prefix = "train" if part == "train" else "t10k"
    fi, fl = _find_idx(roots, f"{prefix}-images-idx3-ubyte"), _find_idx(roots, f"{prefix}-labels-idx1-ubyte")
    if fi is None or fl is None:
        raise DatasetError(f"{p}: no {kind} '{part}' idx files found (expected {prefix}-images-idx3-ubyte[.gz] and "
                           f"{prefix}-labels-idx1-ubyte[.gz])")
    images, labels = read_idx(fi), read_idx(fl)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{fi}: expected images [N, H, W] and labels [N] of equal N, got {list(images.shape)} "
                           f"and {list(labels.shape)}")
    labels = labels.astype(np.int64)
    _check_labels(labels, 10, str(fl))
    names = FASHION_MNIST_CLASSES if kind == "fashion_mnist" else MNIST_CLASSES
    return np.ascontiguousarray(images[..., None]), labels, names


# ----------------------------------------------------------------------------------------------------------------
# scikit-learn digits

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified split of the 1,797 digits: (train, test) sorted index arrays, 20% test, seed 0."""
    from sklearn.model_selection import train_test_split
    _, labels, _ = _digits_all()
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, stratify=labels,
                                   random_state=DIGITS_SPLIT_SEED)
    return np.sort(train), np.sort(test)


def _digits_all():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("digits: scikit-learn is not installed (pip install scikit-learn)") from None
    d = load_digits()
    # 0..16 intensities -> 0..255 by round(v*255/16); the one tie, v=8 -> 127.5, rounds to 128 (as Python's round).
    images = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64), MNIST_CLASSES


def read_digits(part: str):
    """scikit-learn's 8x8 digits: part 'all' (1,797, sklearn order), 'train' (1,437) or 'test' (360).

    Returns images uint8 [N, 8, 8, 1] (0..16 mapped to round(v*255/16)), labels int64 [N], names '0'..'9'.
    """
    images, labels, names = _digits_all()
    if part != "all":
        train, test = digits_split_indices()
        sel = train if part == "train" else test
        images, labels = images[sel], labels[sel]
    return images, labels, names


# ----------------------------------------------------------------------------------------------------------------
# .npz

def _npz_images(x: np.ndarray, source: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DatasetError(f"{source}: expected 'images' NHWC with C in {{1, 3}} (or NHW), got shape "
                           f"{list(x.shape)}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DatasetError(f"{source}: integer 'images' must lie in 0..255, found {x.min()}..{x.max()}")
        return x.astype(np.uint8)
    if not np.issubdtype(x.dtype, np.floating):
        raise DatasetError(f"{source}: 'images' must be uint8 or float, got {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DatasetError(f"{source}: float 'images' contain NaN or inf")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
    if lo < 0.0:
        v = (x + 1.0) / 2.0                       # data space [-1, 1] (sample outputs; clamped like the original)
    elif hi <= 1.0:
        v = x                                     # [0, 1] (ToTensor space)
    else:
        raise DatasetError(f"{source}: float 'images' must lie in [0, 1] or [-1, 1], found {lo:g}..{hi:g}")
    return np.floor(np.clip(v, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def read_npz(path: str | os.PathLike):
    """A ``.npz`` with 'images' and 'labels' (optional 'class_names', 'n_classes').

    'images' NHWC (or NHW) as uint8 0..255, or float: read as [-1, 1] data space if any value is negative
    (values are clamped to [-1, 1], as the sample CLI's raw outputs may overshoot), else as [0, 1]. Floats map
    to uint8 by floor(255*v + 0.5). Returns images uint8 [N, H, W, C], labels int64 [N], class names or None,
    and n_classes (from the file, else max label + 1).
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: no such .npz file (expected a file with 'images' NHWC and 'labels' [N])")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DatasetError(f"{p}: not a readable .npz without pickled objects ({type(e).__name__}: {e})") from None
    missing = [k for k in ("images", "labels") if k not in arrays]
    if missing:
        raise DatasetError(f"{p}: missing array(s) {', '.join(missing)} (expected 'images' NHWC and 'labels' [N], "
                           f"found {sorted(arrays)})")
    images = _npz_images(arrays["images"], str(p))
    labels = arrays["labels"]
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{p}: expected integer 'labels' [{len(images)}], got {labels.dtype} "
                           f"{list(labels.shape)}")
    labels = labels.astype(np.int64)
    names = tuple(str(s) for s in arrays["class_names"].tolist()) if "class_names" in arrays else None
    if "n_classes" in arrays:
        n_classes = int(arrays["n_classes"])
    elif names is not None:
        n_classes = len(names)
    else:
        n_classes = int(labels.max()) + 1 if labels.size else 0
    _check_labels(labels, n_classes, str(p))
    return np.ascontiguousarray(images), labels, names, n_classes


def _check_labels(labels: np.ndarray, n_classes: int, source: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(f"{source}: labels must lie in [0, {n_classes}), found {labels.min()}..{labels.max()}")
