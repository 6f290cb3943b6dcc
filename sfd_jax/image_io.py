"""Image conversion and PNG output. Arrays are NHWC; data space is [-1, 1]."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Data space [-1, 1] -> uint8 as the original's save_image: clamp((x+1)/2, 0, 1), then floor(255·v + 0.5)."""
    v = np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return np.floor(v * 255.0 + 0.5).astype(np.uint8)


def to_pil(img: np.ndarray) -> Image.Image:
    """A uint8 HWC image (C = 1 or 3) as a PIL image (one channel: mode L)."""
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def save_png(img_uint8: np.ndarray, path: str | os.PathLike) -> None:
    """One HWC uint8 image (C = 1 or 3) to a PNG."""
    to_pil(img_uint8).save(path)


def make_grid(images_uint8: np.ndarray, nrow: int, padding: int = 0) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*H, nrow*W, C] image, filled row by row (``nrow`` images per row)."""
    n, h, w, c = images_uint8.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images_uint8[i]
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int, padding: int = 0) -> None:
    """Data-space images [N, H, W, C] to one PNG grid with ``nrow`` images per row."""
    save_png(make_grid(to_uint8(images), nrow, padding), path)
