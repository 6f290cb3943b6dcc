"""Text-to-image training (``mode='sd_pretrain'``) and the world built from labelled images: 1 vs 8 devices with
FSDP, kill and resume, the world's pipeline folder in diffusers, its measurements, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli, subprocess_env

SCRIPT = str(ROOT / "tests" / "scripts" / "sd_pretrain_steps.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A digits world base: VAE trained 2 steps, random UNet and CLIP (the real tokenizer when installed)."""
    from sfd_jax.data.captions import load_world_data
    from sfd_jax.sd.world import VAETraining, build_world_base
    data = load_world_data("digits")
    folder = str(tmp_path_factory.mktemp("world") / "base")
    report = build_world_base(folder, data, held_out=data.dataset.images[:32],
                              vae_training=VAETraining(steps=2, batch=16), progress=False)
    return folder, report


@pytest.mark.slow   # the world fixture compiles the VAE and the text encoder: ~1 min on 2 busy cores
def test_world_base_is_a_pipeline_with_its_measurements(world):
    from sfd_jax.sd.pipeline import load_components
    folder, report = world
    comps = load_components(folder)
    assert comps.vae.in_channels == 1 and len(comps.vae.block_out_channels) == 2   # 4x4 latents for 8x8 digits
    assert comps.vae.scaling_factor == pytest.approx(report["vae"]["scaling_factor"])
    assert comps.unet.cross_attention_dim == comps.text_encoder.hidden_size
    assert json.load(open(os.path.join(folder, "world.json")))["class_names"][0] == "zero"
    for key in ("held_out_mse", "held_out_psnr_db", "latent_std"):
        assert np.isfinite(report["vae"][key])
    text = report["text"]
    assert text["n_classes"] == 10 and text["n_templates"] >= 2
    assert -1 <= text["cosine_other_class_same_template"] <= 1
    assert 0 <= text["centroid_unseen_template_accuracy"] <= 1


def _run_steps(out, base, devices, *args):
    env = subprocess_env(devices)
    proc = subprocess.run([sys.executable, SCRIPT, str(out), base, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


@pytest.mark.slow
def test_sd_pretrain_same_steps_on_1_and_8_devices_with_fsdp(tmp_path, world):
    a = _run_steps(tmp_path / "one.npz", world[0], 1)
    b = _run_steps(tmp_path / "eight.npz", world[0], 8, "--data=2", "--fsdp=4")
    assert int(b["n_devices"]) == 8
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=2e-5)
    large = 0
    for k in a.files:
        if not k.startswith("param"):
            continue
        scale = max(np.abs(a[k]).max(), 1e-12) if (".mu" in k or ".nu" in k) else 1.0
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * scale * (100 if scale != 1.0 else 1), k
        if np.prod(a[k].shape) >= 4096:   # every large array of the state holds 1/4 per device
            large += 1
            assert np.prod(b["shard" + k[5:]]) * 4 == np.prod(a[k].shape), k
    assert large > 10


def _train(workdir, base, *extra):
    return run_cli("sfd_jax.train", "--config=configs/sd_world_pretrain.py", f"--workdir={workdir}",
                   f"--config.sd.model={base}", "--config.training.batch=8", "--config.training.n_iters=4",
                   "--config.training.snapshot_freq=2", "--config.training.log_freq=1",
                   "--config.training.grid_per_class=1", "--config.training.grid_steps=2", *extra)


@pytest.mark.slow
def test_sd_pretrain_resumes_exactly_and_exports(tmp_path, world):
    from sfd_jax.checkpoint import Checkpointer
    base = world[0]
    full = _train(tmp_path / "full", base)
    assert full.returncode == 0, full.stderr[-3000:]
    wd = tmp_path / "full"
    assert sorted(os.listdir(wd / "checkpoints"), key=int) == ["2", "4"]
    assert sorted(os.listdir(wd / "samples")) == ["grid_2.png", "grid_4.png"]
    records = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)

    first = _train(tmp_path / "resumed", base, "--sigterm_at_step=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints"), key=int) == ["2", "3"]
    second = _train(tmp_path / "resumed", base)
    assert second.returncode == 0, second.stderr[-3000:]
    ca, cb = Checkpointer(wd / "checkpoints"), Checkpointer(tmp_path / "resumed" / "checkpoints")
    shapes = {i: ca.item_shapes(i, 4) for i in ("model", "ema", "opt")}
    a, b = ca.restore(shapes, 4), cb.restore(shapes, 4)
    import jax
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # the trained (EMA) UNet exports into a pipeline folder our loader reads
    out = tmp_path / "exported"
    exp = run_cli("sfd_jax.convert", "export-diffusers", f"--checkpoint={wd}", f"--base={base}", f"--out={out}")
    assert exp.returncode == 0, exp.stderr[-2000:]
    from sfd_jax.sd.pipeline import load_components
    comps = load_components(str(out), components=("unet",))
    for x, y in zip(jax.tree_util.tree_leaves(comps.unet_params), jax.tree_util.tree_leaves(a["ema"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@pytest.mark.torch
def test_world_pipeline_loads_in_diffusers_and_samples_like_ours(world):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sfd_jax.sd.pipeline import load_components
    from sfd_jax.sd.sample import make_sampler
    from sfd_jax.sd.tokenizer import tokenize
    from tests.sd_testutil import max_err, nchw, nhwc

    folder = world[0]
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe = type(pipe)(**{**pipe.components, "scheduler": ddim})
    comps = load_components(folder)
    noise = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    ours = make_sampler(comps, steps=3, guidance=3.0)(
        comps.unet_params, comps.vae_params, comps.text_encoder_params, noise,
        tokenize(comps.tokenizer, ["a photo of a three"]), tokenize(comps.tokenizer, [""]))
    ref = pipe("a photo of a three", num_inference_steps=3, guidance_scale=3.0, latents=torch.from_numpy(nchw(noise)),
               num_images_per_prompt=2, output_type="pt", height=8, width=8).images.numpy()
    assert ref.shape == (2, 1, 8, 8)
    assert max_err(nhwc(ref), (np.asarray(ours) / 2 + 0.5).clip(0, 1)) < 1e-4


@pytest.mark.parametrize("override, message", [
    ("--config.sd.model=", "sd.model is required"),
    ("--config.training.caption_dropout=1.5", "training.caption_dropout"),
    ("--config.data.dataset=/nonexistent/x.npz", "/nonexistent/x.npz"),
    ("--config.data.templates=/nonexistent/t.txt", "/nonexistent/t.txt"),
])
def test_bad_sd_pretrain_settings_are_one_line_errors(tmp_path, override, message):
    proc = run_cli("sfd_jax.train", "--config=configs/sd_world_pretrain.py", f"--workdir={tmp_path / 'wd'}",
                   "--config.sd.model=/nonexistent/base", override)
    assert proc.returncode != 0
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1000:]
    assert not (tmp_path / "wd").exists()
