"""Evaluation classifiers: training on real digits, shapes of every architecture, save/load round trip."""
from __future__ import annotations

import time

import jax
import numpy as np
import pytest

from sfd_jax.eval.classifier_train import (TrainConfig, accuracy, load_classifier, predict_logits, save_classifier,
                                           train_classifier)
from sfd_jax.models.classifier import ClassifierConfig, build_classifier, count_params, init_variables


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]     # 8x8x1, 0..255
    perm = np.random.default_rng(1234).permutation(len(images))
    test, train = perm[:360], perm[360:]
    return images[train], d.target[train], images[test], d.target[test]


def test_cnn_learns_sklearn_digits_to_95_percent_held_out_quickly(digits, tmp_path):
    tr_x, tr_y, te_x, te_y = digits
    cfg = ClassifierConfig(arch="cnn", n_classes=10, image_size=8, channels=1)
    t0 = time.time()
    variables, hist = train_classifier(cfg, tr_x, tr_y, te_x, te_y,
                                       tcfg=TrainConfig(epochs=12, batch_size=64, crop_pad=1), progress=False)
    elapsed = time.time() - t0
    assert hist["test_acc"][-1] >= 0.95, hist["test_acc"]
    assert elapsed < 60, elapsed
    # deterministic: a second run from the same seed gives the same weights
    v2, _ = train_classifier(cfg, tr_x, tr_y, tcfg=TrainConfig(epochs=1, batch_size=64, crop_pad=1), progress=False)
    v3, _ = train_classifier(cfg, tr_x, tr_y, tcfg=TrainConfig(epochs=1, batch_size=64, crop_pad=1), progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v2, v3)
    # save / load round trip keeps predictions and the config
    save_classifier(tmp_path / "clf", variables, cfg, {"held_out_accuracy": hist["test_acc"][-1]}, step=7)
    loaded = load_classifier(str(tmp_path / "clf"))
    assert loaded.config == cfg and loaded.meta["held_out_accuracy"] == hist["test_acc"][-1]
    np.testing.assert_allclose(predict_logits(cfg, loaded.variables, te_x), predict_logits(cfg, variables, te_x),
                               rtol=1e-6, atol=1e-6)
    assert accuracy(cfg, loaded.variables, te_x, te_y) == pytest.approx(hist["test_acc"][-1])


@pytest.mark.parametrize("arch,stem,size,channels,input_size", [
    ("cnn", "cifar", 28, 1, None),
    ("cnn", "cifar", 32, 3, None),
    ("resnet18", "cifar", 32, 3, None),
    ("resnet34", "cifar", 64, 3, None),
    ("resnet34", "imagenet", 32, 3, 224),
])
def test_every_architecture_maps_images_to_logits(arch, stem, size, channels, input_size):
    cfg = ClassifierConfig(arch=arch, n_classes=7, image_size=size, channels=channels, stem=stem,
                           input_size=input_size)
    v = init_variables(cfg, jax.random.key(0))
    assert "batch_stats" in v
    x = np.zeros((2, size, size, channels), np.float32)
    logits = build_classifier(cfg).apply(v, x, train=False)
    assert logits.shape == (2, 7)
    _, upd = build_classifier(cfg).apply(v, x + 0.5, train=True, mutable=["batch_stats"])
    assert jax.tree_util.tree_structure(upd["batch_stats"]) == jax.tree_util.tree_structure(v["batch_stats"])
    if arch == "resnet34":
        assert count_params(v) == pytest.approx(21.29e6, rel=0.01)    # torchvision resnet34 with a 7-class fc


def test_config_validation():
    with pytest.raises(ValueError, match="unknown classifier arch"):
        ClassifierConfig(arch="vgg")
    with pytest.raises(ValueError, match="unknown classifier config key"):
        ClassifierConfig.from_dict({"arch": "cnn", "depth": 3})
