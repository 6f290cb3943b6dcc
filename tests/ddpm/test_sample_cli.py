"""`python -m sfd_jax.sample` end to end on our Orbax checkpoints (no torch)."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from sfd_jax.checkpoint import Checkpointer
from sfd_jax.models.ddpm_unet import ConditionalUNet
from tests.conftest import load_config, run_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A distilled-style checkpoint (generator, generator_ema, fake_score) of the tiny config."""
    cfg = load_config("tiny_test")
    model = ConditionalUNet.from_config(cfg)
    p = model.init_params(jax.random.key(0))
    q = model.init_params(jax.random.key(1))
    d = tmp_path_factory.mktemp("run")
    ckpt = Checkpointer(d / "checkpoints")
    ckpt.save(5, {"generator": p, "generator_ema": q, "fake_score": p}, config=cfg, meta={"note": "test"})
    ckpt.wait()
    return d


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    cfg = load_config("tiny_test")
    p = ConditionalUNet.from_config(cfg).init_params(jax.random.key(2))
    d = tmp_path_factory.mktemp("pre")
    ckpt = Checkpointer(d / "checkpoints")
    ckpt.save(0, {"model": p}, config=cfg)
    ckpt.wait()
    return d


def sample(*args, devices=None):
    return run_cli("sfd_jax.sample", *args, "--progress=false", devices=devices)


def test_npz_output_and_class_selection(run_dir, tmp_path):
    out = tmp_path / "s.npz"
    proc = sample(f"--checkpoint={run_dir}", "--classes=x0,x3", "--n_per_class=2", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    d = np.load(out)
    assert d["images"].shape == (16, 16, 16, 3) and d["images"].dtype == np.float32
    np.testing.assert_array_equal(d["labels"], np.repeat([1, 2, 4, 5, 6, 7, 8, 9], 2))
    assert np.abs(d["images"]).max() > 0


def test_png_folder_names_and_grid(run_dir, tmp_path):
    out = tmp_path / "pngs"
    proc = sample(f"--checkpoint={run_dir}/checkpoints/5", "--classes=2,7", "--n_per_class=3", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(out))
    assert names == sorted([f"{c:03d}_{i:05d}.png" for c in (2, 7) for i in range(3)] + ["grid.png"])
    assert Image.open(out / "002_00000.png").size == (16, 16)
    assert Image.open(out / "grid.png").size == (3 * 16, 2 * 16)   # one row per class


def test_images_do_not_depend_on_batch_size_or_device_count(run_dir, tmp_path):
    args = [f"--checkpoint={run_dir}", "--n_per_class=2", "--seed=3"]
    assert sample(*args, "--batch=4", f"--out={tmp_path / 'a.npz'}").returncode == 0
    assert sample(*args, "--batch=32", f"--out={tmp_path / 'b.npz'}", devices=8).returncode == 0
    a, b = np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_stochastic_ddim_is_the_same_on_1_and_8_devices(pretrained_dir, tmp_path):
    args = [f"--checkpoint={pretrained_dir}", "--n_per_class=1", "--sampler=ddim", "--steps=4", "--eta=1",
            "--cond_scale=1.5", "--batch=16", "--weights=raw"]
    assert sample(*args, f"--out={tmp_path / 'a.npz'}").returncode == 0
    assert sample(*args, f"--out={tmp_path / 'b.npz'}", devices=8).returncode == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"],
                               atol=1e-4)


def test_replayed_noise_and_labels(run_dir, tmp_path):
    noise = np.random.default_rng(0).standard_normal((3, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "n.npy", noise)
    np.save(tmp_path / "l.npy", np.array([9, 0, 4]))
    proc = sample(f"--checkpoint={run_dir}", f"--noise={tmp_path / 'n.npy'}", f"--labels={tmp_path / 'l.npy'}",
                  "--weights=raw", f"--out={tmp_path / 'o.npz'}")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "o.npz")["labels"], [9, 0, 4])


@pytest.mark.parametrize("case", ["missing_checkpoint", "wrong_config", "label_out_of_range", "labels_file_range",
                                  "unknown_sampler", "no_ema", "pth_without_config"])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(case, run_dir, pretrained_dir, tmp_path):
    out = tmp_path / "out"
    np.save(tmp_path / "bad_labels.npy", np.array([1, 11]))
    (tmp_path / "x.pth").write_bytes(b"not a checkpoint")
    args, expect = {
        "missing_checkpoint": ([f"--checkpoint={tmp_path / 'nope'}"], "does not exist"),
        "wrong_config": ([f"--checkpoint={run_dir}", "--config=configs/cifar10_sfd.py"], "null_classes_emb"),
        "label_out_of_range": ([f"--checkpoint={run_dir}", "--classes=3,10"], "class 10 is outside [0, 10)"),
        "labels_file_range": ([f"--checkpoint={run_dir}", f"--labels={tmp_path / 'bad_labels.npy'}"],
                              "label 11 is outside [0, 10)"),
        "unknown_sampler": ([f"--checkpoint={run_dir}", "--sampler=euler"], "unknown sampler 'euler'"),
        "no_ema": ([f"--checkpoint={pretrained_dir}"], "no 'ema' weights"),
        "pth_without_config": ([f"--checkpoint={tmp_path / 'x.pth'}"], "--config"),
    }[case]
    proc = sample(*args, f"--out={out}")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("sfd_jax.sample: error:") and expect in lines[0], proc.stderr
    assert not out.exists()


def test_console_script_dispatch_and_help():
    proc = run_cli("sfd_jax", "sample", "--helpshort")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--sampler" in proc.stdout and "--n_per_class" in proc.stdout
    proc = run_cli("sfd_jax", "frobnicate")
    assert proc.returncode == 2 and "unknown command" in proc.stderr
