"""Image data for DDPM pretraining and classifier training
(README: "The original release and our differences" › DDPM pretraining).

- ``formats``: file readers (CIFAR-10 python batches/tar.gz, STL-10 .bin, idx, sklearn digits, .npz); a safe
  unpickler for the CIFAR pickles.
- ``images``: :class:`ImageDataset` (uint8 NHWC in memory), :func:`load_dataset`, :func:`dataset_from_config`,
  :func:`to_model_space` (uint8 -> float32 [-1, 1]), :func:`random_flip`.
- ``pipeline``: :class:`BatchStream` (deterministic, resumable, per-process batches), :func:`prefetch`.
"""
from sfd_jax.data.formats import DatasetError, digits_split_indices, safe_unpickle
from sfd_jax.data.images import (DATASETS, DEFAULT_SPLITS, ImageDataset, canonical_name, convert_channels,
                                 dataset_from_config, flip_where, load_dataset, random_flip, resize_images,
                                 to_model_space)
from sfd_jax.data.pipeline import BatchStream, Prefetcher, device_put_fn, prefetch

__all__ = [
    "DATASETS", "DEFAULT_SPLITS", "BatchStream", "DatasetError", "ImageDataset", "Prefetcher", "canonical_name",
    "convert_channels", "dataset_from_config", "device_put_fn", "digits_split_indices", "flip_where",
    "load_dataset", "prefetch", "random_flip", "resize_images", "safe_unpickle", "to_model_space",
]
