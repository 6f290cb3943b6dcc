"""Forgetting metrics on crafted classifier outputs, and reading labelled sample folders/npz files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from sfd_jax.cli_utils import UsageError
from sfd_jax.eval.forgetting import forgetting_metrics, format_table
from sfd_jax.eval.samples import read_images

# Four samples, three classes, forget class 0. Probabilities are chosen so every figure is easy by hand.
PROBS = np.array([
    [0.50, 0.25, 0.25],   # conditioned on 0, still recognised as 0; entropy 1.5 ln 2
    [0.25, 0.50, 0.25],   # conditioned on 0, recognised as 1;       entropy 1.5 ln 2
    [0.10, 0.80, 0.10],   # conditioned on 1, correct
    [0.20, 0.20, 0.60],   # conditioned on 2, correct
])
LABELS = np.array([0, 0, 1, 2])


def test_per_class_averages_of_the_forgotten_class():
    r = forgetting_metrics(np.log(PROBS) + 3.0, LABELS, 0)     # logits up to a constant
    f = r["forgotten"]
    assert f["normalisation"] == "per_class" and f["n"] == 2
    assert f["entropy"] == pytest.approx(1.5 * math.log(2))
    assert f["prob"] == pytest.approx((0.5 + 0.25) / 2)
    assert f["acc"] == pytest.approx(0.5)
    assert r["per_class"]["0"]["accuracy"] == pytest.approx(0.5)
    assert r["per_class"]["1"]["accuracy"] == 1.0 and r["per_class"]["2"]["accuracy"] == 1.0
    assert r["per_class"]["1"]["mean_prob"] == pytest.approx(0.8)
    assert r["mean_accuracy_remaining"] == 1.0
    assert r["mean_accuracy_all"] == pytest.approx(2.5 / 3)
    assert r["forget_class"] == 0 and r["n_images"] == 4
    assert "forgotten" in format_table(r)
    json.dumps(r)


def test_original_normalisation_divides_by_all_images():
    f = forgetting_metrics(np.log(PROBS), LABELS, 0, original_normalisation=True)["forgotten"]
    assert f["normalisation"] == "all_images"
    assert f["entropy"] == pytest.approx(2 * 1.5 * math.log(2) / 4)
    assert f["prob"] == pytest.approx(0.75 / 4)
    assert f["acc"] == pytest.approx(1 / 4)


def test_entropy_is_stable_for_confident_logits():
    logits = np.array([[1000.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    f = forgetting_metrics(logits, np.array([0, 0]), 0)["forgotten"]
    assert f["entropy"] == pytest.approx(math.log(3) / 2)
    assert f["prob"] == pytest.approx((1 + 1 / 3) / 2)


def test_labels_outside_the_classifier_are_rejected():
    with pytest.raises(ValueError, match="outside"):
        forgetting_metrics(np.zeros((2, 3)), np.array([0, 3]), 0)
    with pytest.raises(ValueError, match="forget class 5"):
        forgetting_metrics(np.zeros((2, 3)), np.array([0, 1]), 5)


def test_folder_labels_from_names_and_dataset_json(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    for name, v in [("000_00000.png", 10), ("000_00001.png", 20), ("003_00000.png", 30)]:
        Image.fromarray(np.full((8, 8), v, np.uint8)).save(d / name)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / "grid.png")    # our sample CLI's grid is skipped
    s = read_images(str(d))
    assert s.images.shape == (3, 8, 8, 1) and s.labels.tolist() == [0, 0, 3]
    assert s.images[:, 0, 0, 0].tolist() == [10, 20, 30]
    (d / "dataset.json").write_text(json.dumps({"labels": [["000_00000.png", 5], ["000_00001.png", 6],
                                                           ["003_00000.png", 7]]}))
    assert read_images(str(d)).labels.tolist() == [5, 6, 7]
    assert read_images(str(d), exclude_regex=r"000_\d{5}\.png").labels.tolist() == [7]


def test_npz_float_samples_are_quantised_like_pngs(tmp_path):
    x = np.array([-1.0, 0.0, 1.0, 2.0], np.float32).reshape(4, 1, 1, 1) * np.ones((1, 2, 2, 1), np.float32)
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(4))
    s = read_images(str(tmp_path / "a.npz"))
    assert s.images[:, 0, 0, 0].tolist() == [0, 128, 255, 255] and s.labels.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "nchw.npz", images=np.zeros((2, 3, 5, 5), np.uint8))
    assert read_images(str(tmp_path / "nchw.npz")).images.shape == (2, 5, 5, 3)


def test_empty_folder_and_bad_npz_give_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no PNG images"):
        read_images(str(tmp_path / "empty"))
    np.savez(tmp_path / "x.npz", foo=np.zeros(3))
    with pytest.raises(UsageError, match="no 'images'"):
        read_images(str(tmp_path / "x.npz"))
