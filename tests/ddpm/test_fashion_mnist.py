"""The Fashion-MNIST recipe on the real files (Debian package ``dataset-fashion-mnist``): the configs load the data
at 32x32x1 and a few pretraining steps of a reduced model give a finite, falling loss."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_config

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="real Fashion-MNIST absent: apt-get install dataset-fashion-mnist "
           "(puts idx files in /usr/share/datasets/fashion-mnist)")


def test_fashion_mnist_configs_agree_on_data_and_architecture():
    train, sfd = load_config("fashion_mnist_train"), load_config("fashion_mnist_sfd")
    assert train.mode == "pretrain" and sfd.mode == "sfd"
    for key in ("dataset", "path", "image_size", "channels", "n_classes"):
        assert train.data[key] == sfd.data[key], key
    for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels", "out_ch"):
        assert train.model[key] == sfd.model[key], key
    assert (train.data.image_size, train.data.channels, train.model.in_channels) == (32, 1, 1)


def test_fashion_mnist_pretraining_smoke(tmp_path):
    from sfd_jax.data import dataset_from_config
    from sfd_jax.ddpm.trainer import Trainer   # not sfd_jax.train, whose import defines absl flags

    cfg = load_config("fashion_mnist_train", **{
        "model.ch": 32, "model.ch_mult": (1, 2), "model.num_res_blocks": 1, "model.attn_resolutions": (),
        "training.batch_size": 16, "training.n_iters": 24, "training.log_freq": 6, "training.snapshot_freq": 24,
        "training.visualization_samples": 10, "sampling.batch_size": 10, "sampling.grid_steps": 2})
    ds = dataset_from_config(cfg)
    assert ds.images.shape == (60000, 32, 32, 1) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(ds.labels), [6000] * 10)

    Trainer(cfg, str(tmp_path / "run")).run()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses                        # falling
    assert (tmp_path / "run" / "checkpoints" / "24").is_dir()
