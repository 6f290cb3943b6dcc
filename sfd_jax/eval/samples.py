"""Read image sets for evaluation: a folder of PNGs or an ``.npz``, as uint8 NHWC with optional labels.

Folders: every ``*.png`` below the folder (recursive, sorted by relative path). Labels come from a
``dataset.json`` (``{"labels": [[file, label], ...]}``, as written by the original's ``save_base_dataset.py``)
when present, else from the file-name prefix before the first ``_`` (``003_00012.png`` -> 3: the original's and
our ``sample --out DIR`` naming); files without either have no label.

npz: ``images`` (or ``arr_0``, the guided-diffusion reference batches) NHWC or NCHW, uint8 (0..255) or float
(data space [-1, 1], converted with :func:`sfd_jax.image_io.to_uint8`, i.e. as a PNG would store them), and
optional ``labels``. A [N, H, W] array is one-channel.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import numpy as np

from sfd_jax.cli_utils import UsageError


@dataclasses.dataclass
class ImageSet:
    images: np.ndarray                  # uint8 [N, H, W, C], C in {1, 3}
    labels: np.ndarray | None           # int64 [N] or None
    names: list[str]                    # file names (folders) or 'npz[i]'
    source: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def content_hash(self) -> str:
        """sha256 of the pixels (shape included): equal for the same images from a folder or an npz."""
        h = hashlib.sha256(repr(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()

    def select(self, mask: np.ndarray) -> "ImageSet":
        idx = np.flatnonzero(mask)
        return ImageSet(self.images[idx], None if self.labels is None else self.labels[idx],
                        [self.names[i] for i in idx], self.source)


def _label_from_name(name: str) -> int | None:
    m = re.match(r"^(\d+)_", os.path.basename(name))
    return int(m.group(1)) if m else None


def _as_nhwc_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise UsageError(f"{what}: expected images [N, H, W, C], got shape {arr.shape}")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[1] in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.shape[-1] not in (1, 3):
        raise UsageError(f"{what}: images must have 1 or 3 channels, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        from sfd_jax.image_io import to_uint8
        finite = np.isfinite(arr).reshape(len(arr), -1).all(-1)
        if not finite.all():
            raise UsageError(f"{what}: {int((~finite).sum())} of {len(arr)} images contain NaN or inf "
                             f"(first: image {int(np.flatnonzero(~finite)[0])}); refusing to score them")
        return to_uint8(arr)
    raise UsageError(f"{what}: images must be uint8 (0..255) or float (data space [-1, 1]), got {arr.dtype}")


def read_npz(path: str) -> ImageSet:
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UsageError(f"{path} is a single .npy array, not an .npz with 'images'")
    with z:
        key = "images" if "images" in z.files else ("arr_0" if "arr_0" in z.files else None)
        if key is None:
            raise UsageError(f"{path} has no 'images' (or 'arr_0') array; it holds {', '.join(z.files) or 'nothing'}")
        try:
            images = z[key]
            labels = np.asarray(z["labels"]) if "labels" in z.files else None
        except (ValueError, OSError, EOFError) as e:   # object arrays (pickles) are refused; corrupt members
            raise UsageError(f"{path}: unreadable array ({type(e).__name__}: {e})") from None
        images = _as_nhwc_uint8(images, path)
        if labels is not None:
            if labels.dtype.kind not in "iub":
                raise UsageError(f"{path}: 'labels' must be integers, got {labels.dtype}")
            labels = labels.astype(np.int64).reshape(-1)
    if len(images) == 0:
        raise UsageError(f"{path} holds no images")
    if labels is not None and len(labels) != len(images):
        raise UsageError(f"{path}: {len(labels)} labels for {len(images)} images")
    return ImageSet(images, labels, [f"npz[{i}]" for i in range(len(images))], path)


def read_folder(path: str, exclude_regex: str | None = None, progress: bool = False) -> ImageSet:
    from PIL import Image
    from tqdm.auto import tqdm

    files = sorted(os.path.relpath(os.path.join(r, f), path)
                   for r, _, fs in os.walk(path) for f in fs if f.lower().endswith(".png"))
    if exclude_regex:
        pat = re.compile(exclude_regex)
        files = [f for f in files if not pat.search(f)]
    files = [f for f in files if os.path.basename(f) != "grid.png"]   # our sample CLI's overview grid
    if not files:
        raise UsageError(f"no PNG images in {path}" + (f" after excluding {exclude_regex!r}" if exclude_regex else ""))
    table = None
    meta = os.path.join(path, "dataset.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            table = {os.path.normpath(k): int(v) for k, v in (json.load(f).get("labels") or [])}
    imgs, labels = [], []
    for f in tqdm(files, desc="reading PNGs", unit="img", disable=not progress or len(files) < 1000, leave=False):
        with Image.open(os.path.join(path, f)) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in ("1", "LA", "I", "I;16", "F") else "RGB")
            imgs.append(np.asarray(im))
        lab = table.get(os.path.normpath(f)) if table is not None else _label_from_name(f)
        labels.append(-1 if lab is None else lab)
    shapes = {a.shape[:2] for a in imgs}
    if len(shapes) > 1:
        raise UsageError(f"{path}: images have different sizes {sorted(shapes)[:3]}; all must be the same size")
    if any(a.ndim == 3 for a in imgs) and any(a.ndim == 2 for a in imgs):
        imgs = [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in imgs]
    images = _as_nhwc_uint8(np.stack(imgs), path)
    labels = np.asarray(labels, np.int64)
    return ImageSet(images, None if (labels < 0).all() else labels, files, path)


def read_images(path: str, *, exclude_regex: str | None = None, progress: bool = False) -> ImageSet:
    """A folder of PNGs or an npz (see the module docstring). Raises UsageError when missing or empty."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"samples {path!r} do not exist")
    if os.path.isdir(path):
        return read_folder(path, exclude_regex, progress)
    if path.endswith(".npz"):
        s = read_npz(path)
        if exclude_regex:
            raise UsageError("--exclude_regex applies to PNG folders only; use --exclude_class for an npz")
        return s
    raise UsageError(f"{path} is neither a folder of PNGs nor an .npz")
