"""Image datasets for DDPM pretraining and classifier training
(README: "The original release and our differences" › DDPM pretraining).

Images are held in memory as uint8 NHWC arrays (values 0..255); :func:`to_model_space` maps them to the model's
data space, float32 in [-1, 1] (ToTensor's x/255, then 2x-1). :func:`load_dataset` reads the original files
(see ``formats.py``) and applies the original's ``Resize(image_size)`` (PIL bilinear) and optional channel
changes once, at load time, so training steps only gather, flip and rescale.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image

from sfd_jax.data import formats
from sfd_jax.data.formats import DatasetError

# Canonical dataset keys. Lookup is case-insensitive and ignores '_', '-' and spaces, so the original configs'
# 'CIFAR10', 'STL10', 'MNIST' and 'FashionMNIST' all resolve.
DATASETS = ("cifar10", "stl10", "mnist", "fashion_mnist", "digits", "npz")
_ALIASES = {"cifar10": "cifar10", "stl10": "stl10", "mnist": "mnist", "fashionmnist": "fashion_mnist",
            "digits": "digits", "npz": "npz"}
# The split the original's get_dataset used for each dataset: STL-10 joins train and test.
DEFAULT_SPLITS = {"cifar10": "train", "stl10": "train+test", "mnist": "train", "fashion_mnist": "train",
                  "digits": "train", "npz": "all"}
DEFAULT_PATH = "./data"   # the original's config.data.path


@dataclasses.dataclass(eq=False)
class ImageDataset:
    """A labelled image set held in host memory.

    images: uint8 [N, H, W, C] (NHWC, 0..255, C = 1 or 3); labels: int64 [N] in [0, n_classes);
    name: canonical dataset key (``DATASETS``); class_names: one name per class, or None.
    """
    images: np.ndarray
    labels: np.ndarray
    n_classes: int
    name: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise DatasetError(f"{self.name}: images must be uint8 [N, H, W, C] with C in {{1, 3}}, got "
                               f"{self.images.dtype} {list(self.images.shape)}")
        if self.labels.shape != (len(self.images),) or not np.issubdtype(self.labels.dtype, np.integer):
            raise DatasetError(f"{self.name}: labels must be integer [{len(self.images)}], got "
                               f"{self.labels.dtype} {list(self.labels.shape)}")
        self.labels = self.labels.astype(np.int64, copy=False)
        self.n_classes = int(self.n_classes)
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.n_classes):
            raise DatasetError(f"{self.name}: labels must lie in [0, {self.n_classes}), found "
                               f"{self.labels.min()}..{self.labels.max()}")
        if self.class_names is not None:
            self.class_names = tuple(self.class_names)
            if len(self.class_names) != self.n_classes:
                raise DatasetError(f"{self.name}: {len(self.class_names)} class names for {self.n_classes} classes")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.images.shape[1:])

    def subset(self, indices) -> "ImageDataset":
        """The images at ``indices`` (any integer index array or boolean mask), in that order."""
        idx = np.asarray(indices)
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])

    def select_labels(self, keep: Sequence[int]) -> "ImageDataset":
        """Only the images whose label is in ``keep`` (labels are not renumbered), original order kept."""
        return self.subset(np.isin(self.labels, check_keep(keep, self.n_classes, self.name)))


def check_keep(keep, n_classes: int, name: str) -> np.ndarray:
    keep = np.unique(np.asarray(list(keep), dtype=np.int64))
    if keep.size and (keep.min() < 0 or keep.max() >= n_classes):
        raise ValueError(f"{name}: labels_keep must lie in [0, {n_classes}), got {keep.tolist()}")
    return keep


def canonical_name(name: str) -> str:
    """'CIFAR10' -> 'cifar10', 'FashionMNIST' / 'fashion_mnist' -> 'fashion_mnist', ... (DatasetError if unknown)."""
    key = "".join(ch for ch in str(name).lower() if ch not in "_- ")
    if key not in _ALIASES:
        raise DatasetError(f"unknown dataset '{name}' (expected one of: CIFAR10, STL10, MNIST, FashionMNIST, digits, "
                           f"npz)")
    return _ALIASES[key]


def _split_parts(key: str, split: str) -> list[str]:
    s = str(split).lower().replace(" ", "")
    if key == "digits":
        if s not in ("train", "test", "all"):
            raise DatasetError(f"digits: unknown split '{split}' (expected 'train', 'test' or 'all')")
        return [s]
    if key == "npz":
        if s not in ("train", "all"):
            raise DatasetError(f"npz: unknown split '{split}' (a .npz holds one set: use 'all' or 'train')")
        return [s]
    if s == "all":
        s = "train+test"
    parts = s.split("+")
    if not parts or any(p not in ("train", "test") for p in parts) or len(set(parts)) != len(parts):
        raise DatasetError(f"{key}: unknown split '{split}' (expected 'train', 'test' or 'train+test')")
    return parts


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 resized like torchvision ``Resize(size)`` on PIL images (bilinear).

    The smaller edge becomes ``size`` and the other keeps the aspect ratio (square images -> size x size).
    """
    n, h, w, c = images.shape
    if size <= 0:
        raise DatasetError(f"image_size must be positive, got {size}")
    if w <= h:
        ow, oh = size, int(size * h / w)
    else:
        oh, ow = size, int(size * w / h)
    if (oh, ow) == (h, w):
        return images
    out = np.empty((n, oh, ow, c), np.uint8)
    for i in range(n):
        img = Image.fromarray(images[i, ..., 0] if c == 1 else images[i])
        r = np.asarray(img.resize((ow, oh), Image.BILINEAR))
        out[i] = r[..., None] if c == 1 else r
    return out


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> [N, H, W, channels]: 1 -> 3 replicates; 3 -> 1 is PIL's 'L' (ITU-R 601-2 luma)."""
    c = images.shape[-1]
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels}")
    if c == channels:
        return images
    if c == 1:
        return np.ascontiguousarray(np.repeat(images, 3, axis=-1))
    n, h, w, _ = images.shape
    if n == 0:
        return np.zeros((0, h, w, 1), np.uint8)
    # A per-pixel conversion, so one tall image converts the whole set in one call.
    grey = np.asarray(Image.fromarray(np.ascontiguousarray(images.reshape(n * h, w, 3))).convert("L"))
    return grey.reshape(n, h, w, 1)


def load_dataset(name: str, path: str | os.PathLike | None = None, *, split: str = "train",
                 image_size: int | None = None, channels: int | None = None) -> ImageDataset:
    """Load a labelled image dataset into memory as uint8 NHWC.

    name: 'cifar10' | 'stl10' | 'mnist' | 'fashion_mnist' | 'digits' | 'npz' (case-insensitive; the original
      spellings 'CIFAR10', 'STL10', 'MNIST', 'FashionMNIST' work).
    path: the dataset directory (for 'cifar10' also the cifar-10-python.tar.gz itself; for 'npz' the file);
      None means ``./data``, the original's default. Unused for 'digits'.
    split: 'train' | 'test' | 'train+test' ('all' is the same) for the file datasets; 'train' | 'test' | 'all'
      for 'digits' (a fixed stratified 80/20 split, seed 0); 'all' or 'train' (the whole file) for 'npz'.
      SFD's STL-10 uses 'train+test' (13,000 images).
    image_size: if given, PIL-bilinear resize (torchvision ``Resize(image_size)``); None keeps the native size.
    channels: if given, 1 or 3 (grey is replicated to RGB; RGB becomes PIL 'L'); None keeps the native channels.

    Returns an :class:`ImageDataset` with images uint8 [N, H, W, C] and labels int64 [N]. Raises
    :class:`DatasetError` (a ValueError) naming the file and what was expected when files are missing or malformed.
    """
    key = canonical_name(name)
    parts = _split_parts(key, split)
    root = os.fspath(path) if path is not None else DEFAULT_PATH
    if key == "npz":
        images, labels, names, n_classes = formats.read_npz(root)
    else:
        chunks = []
        for part in parts:
            if key == "cifar10":
                chunks.append(formats.read_cifar10(root, part))
            elif key == "stl10":
                chunks.append(formats.read_stl10(root, part))
            elif key in ("mnist", "fashion_mnist"):
                chunks.append(formats.read_idx_dataset(root, part, kind=key))
            else:
                chunks.append(formats.read_digits(part))
        images = chunks[0][0] if len(chunks) == 1 else np.concatenate([c[0] for c in chunks])
        labels = chunks[0][1] if len(chunks) == 1 else np.concatenate([c[1] for c in chunks])
        names = chunks[0][2]
        n_classes = 10
    if channels is not None and channels < images.shape[-1]:
        images = convert_channels(images, channels)
    if image_size is not None:
        images = resize_images(images, int(image_size))
    if channels is not None and channels > images.shape[-1]:
        images = convert_channels(images, channels)
    return ImageDataset(images=images, labels=labels, n_classes=n_classes, name=key, class_names=names)


def dataset_from_config(config) -> ImageDataset:
    """``load_dataset`` from ``config.data``: dataset, path, image_size, channels (and optional split).

    The split defaults to the one the original trained on (``DEFAULT_SPLITS``: STL-10 'train+test', others
    'train'). ``config.data.n_classes``, when present, must match the dataset (an npz without 'n_classes' takes
    it from the config when its labels fit).
    """
    d = config.data
    key = canonical_name(d.dataset)
    split = d.get("split", None) or DEFAULT_SPLITS[key]
    ds = load_dataset(key, d.get("path", None), split=split, image_size=d.get("image_size", None),
                      channels=d.get("channels", None))
    want = d.get("n_classes", None)
    if want is not None and int(want) != ds.n_classes:
        top = int(ds.labels.max()) + 1 if len(ds) else 0
        if key == "npz" and top <= int(want) and ds.class_names is None:
            ds = dataclasses.replace(ds, n_classes=int(want))
        else:
            raise DatasetError(f"config.data.n_classes={want} but {d.dataset} at '{d.get('path', None)}' has "
                               f"{ds.n_classes} classes")
    return ds


def to_model_space(images_uint8):
    """uint8 [..., H, W, C] (0..255) -> float32 in [-1, 1]: x/255 (ToTensor), then 2x-1 (the original's rescale).

    Works on numpy arrays (returns numpy) and jax arrays (returns jax, traceable).
    """
    x = images_uint8.astype(np.float32) / np.float32(255.0)
    return x * np.float32(2.0) - np.float32(1.0)


def flip_where(x, flips):
    """Mirror the images of NHWC ``x`` left-right (the W axis) where the bool [N] ``flips`` is True."""
    if isinstance(x, np.ndarray):
        return np.where(np.asarray(flips)[:, None, None, None], x[:, :, ::-1], x)
    import jax.numpy as jnp
    return jnp.where(jnp.asarray(flips)[:, None, None, None], x[:, :, ::-1], x)


def random_flip(rng, x):
    """RandomHorizontalFlip(0.5) per image of NHWC ``x``.

    rng: a ``numpy.random.Generator`` (host; returns numpy) or a JAX PRNG key (traceable; returns a jax array).
    """
    if isinstance(rng, np.random.Generator):
        return flip_where(np.asarray(x), rng.random(len(x)) < 0.5)
    import jax
    return flip_where(x, jax.random.bernoulli(rng, 0.5, (x.shape[0],)))
