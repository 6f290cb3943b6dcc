"""Labelled images as a text-to-image data set: a caption per image from class names and caption templates.

- Class names: one per line in a file, or the built-in names (:data:`BUILTIN_CLASS_NAMES`: scikit-learn digits
  as number words, Fashion-MNIST's ten garments).
- Templates: lines holding ``{name}`` (``"a photo of a {name}"``), from a file or :data:`DEFAULT_TEMPLATES`.
- :class:`CaptionedImages`: the image data set (:class:`sfd_jax.data.ImageDataset`), its class names and
  templates. The caption of the i-th image of global step k is ``templates[j].format(name=class_names[label])``
  with j drawn from ``default_rng([seed, CAPTION_TAG, k])`` for the whole global batch, so per-process slices
  and resumed runs see the same captions as one uninterrupted process.
- :func:`class_prompts`: the evaluation prompts of one class (templates cycled), :func:`load_world_data` the
  built-in or npz image sets.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from sfd_jax.data.formats import DatasetError
from sfd_jax.data.images import ImageDataset, load_dataset

CAPTION_TAG = 0x63617074   # 'capt': keeps the caption seeds apart from the batch stream's epoch seeds

DEFAULT_TEMPLATES = (
    "a photo of a {name}",
    "a picture of a {name}",
    "an image of a {name}",
    "a drawing of a {name}",
    "a black and white photo of a {name}",
    "a small picture of a {name}",
    "a close-up photo of a {name}",
    "a {name}",
)

BUILTIN_CLASS_NAMES = {
    "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "fashion_mnist": ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"),
}


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty lines of a text file (CR and surrounding blanks stripped); a missing or empty file is an error."""
    if not os.path.isfile(path):
        raise DatasetError(f"{what} {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f.read().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DatasetError(f"{what} {path!r} holds no lines")
    return lines


def read_templates(path: str | None) -> tuple[str, ...]:
    """Caption templates from ``path`` (one per line, each with ``{name}``), or :data:`DEFAULT_TEMPLATES`."""
    if not path:
        return DEFAULT_TEMPLATES
    lines = read_lines(path, "templates file")
    for ln in lines:
        if "{name}" not in ln:
            raise DatasetError(f"templates file {path!r}: line {ln!r} has no {{name}} placeholder")
    return tuple(lines)


def caption(template: str, name: str) -> str:
    return template.replace("{name}", name)


def concept_regex(name: str) -> str:
    """The case-insensitive regex of a class name inside its captions (for the forget -> override rewrite)."""
    return re.escape(name)


@dataclasses.dataclass
class CaptionedImages:
    """Images, labels and captions drawn from templates (see the module docstring)."""
    dataset: ImageDataset
    class_names: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    def __post_init__(self):
        self.class_names = tuple(self.class_names)
        if len(self.class_names) != self.dataset.n_classes:
            raise DatasetError(f"{len(self.class_names)} class names for the {self.dataset.n_classes} classes of "
                               f"{self.dataset.name}")
        if len(set(self.class_names)) != len(self.class_names):
            raise DatasetError(f"class names must be distinct, got {list(self.class_names)}")
        if not self.templates:
            raise DatasetError("no caption templates")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def captions(self, labels: np.ndarray, seed: int, step: int) -> list[str]:
        """Captions of a global batch's labels [B] at ``step`` (template per sample from the step's seed)."""
        j = np.random.default_rng([int(seed), CAPTION_TAG, int(step)]).integers(0, len(self.templates), len(labels))
        return [caption(self.templates[t], self.class_names[int(c)]) for t, c in zip(j, labels)]

    def all_captions(self, label: int) -> list[str]:
        """Every caption of class ``label`` (one per template)."""
        return [caption(t, self.class_names[label]) for t in self.templates]


def class_prompts(class_names, templates, label: int, n: int) -> list[str]:
    """``n`` prompts of class ``label``: the templates cycled in order."""
    return [caption(templates[i % len(templates)], class_names[label]) for i in range(n)]


def load_world_data(data: str, class_names_path: str | None = None, templates_path: str | None = None, *,
                    split: str = "train") -> CaptionedImages:
    """``data``: 'digits' | 'fashion_mnist' (the Debian package's files, or ``./data``) | a path to an npz
    (``images`` NHWC uint8, ``labels``; optional ``class_names``). Class names from ``class_names_path``, else the
    npz's, else the built-in ones."""
    if data in BUILTIN_CLASS_NAMES:
        path = None
        if data == "fashion_mnist":
            path = fashion_mnist_dir()
        ds = load_dataset(data, path, split=split)
        names = BUILTIN_CLASS_NAMES[data]
    else:
        if not os.path.isfile(data):
            raise DatasetError(f"--data {data!r}: neither a built-in data set (digits, fashion_mnist) nor an npz file")
        ds = load_dataset("npz", data, split="all")
        names = ds.class_names
    if class_names_path:
        names = tuple(read_lines(class_names_path, "class names file"))
    if names is None:
        raise DatasetError(f"{data}: no class names (pass a class-names file, one name per line)")
    return CaptionedImages(ds, tuple(names), read_templates(templates_path))


def fashion_mnist_dir() -> str:
    """Where the Fashion-MNIST idx files are: ``./data`` if it holds them, else the Debian package's folder."""
    for cand in ("./data", "./data/fashion_mnist", "/usr/share/dataset-fashion-mnist",
                 "/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist"):
        if os.path.isdir(cand) and any("idx" in f for f in os.listdir(cand)):
            return cand
    return "./data"
