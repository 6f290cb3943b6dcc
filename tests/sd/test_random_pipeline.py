"""sfd_jax.sd.random_pipeline: random SD pipelines written without torch load with load_components and with diffusers."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.sd import random_pipeline as sd_random
from sfd_jax.sd.pipeline import load_components
from sfd_jax.sd.tokenizer import tokenize
from tests.conftest import last_line, run_cli
from tests.sd_testutil import max_err, nchw

PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sd_random.write_random_pipeline(str(tmp_path_factory.mktemp("tiny")), "tiny", seed=3)


def _leaves_equal(a, b) -> bool:
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _run_all(comps, batch: int = 3):
    ids = tokenize(comps.tokenizer, PROMPTS[:batch])
    text = comps.text_encoder.apply({"params": comps.text_encoder_params}, jnp.asarray(ids))
    ctx = text.last_hidden_state
    x = jax.random.normal(jax.random.key(0), (batch, 8, 8, 4))
    eps = jax.jit(comps.unet.apply)({"params": comps.unet_params}, x, jnp.asarray([1, 500, 999][:batch]), ctx)
    from sfd_jax.models.vae import decode_latents

    img = decode_latents(comps.vae, comps.vae_params, x)
    return ids, ctx, eps, img


# ------------------------------------------------------------------------------------------------ no torch
def test_tiny_folder_layout_and_configs(tiny):
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
                "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                "scheduler/scheduler_config.json"):
        assert os.path.isfile(os.path.join(tiny, rel)), rel
    index = json.load(open(os.path.join(tiny, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    sched = json.load(open(os.path.join(tiny, "scheduler", "scheduler_config.json")))
    assert sched == {**sched, "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False,
                     "skip_prk_steps": True, "clip_sample": False, "prediction_type": "epsilon",
                     "num_train_timesteps": 1000}


def test_tiny_folder_loads_runs_and_holds_the_generated_params(tiny):
    comps = load_components(tiny)
    assert comps.schedule.prediction_type == "epsilon" and comps.tokenizer is not None
    mem = sd_random.random_components("tiny", seed=3)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(comps, f"{name}_params"), getattr(mem, f"{name}_params")
        assert _leaves_equal(got, want), name
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(got))
    # every parameter was moved off a constant init (no all-zero biases, no all-one norm scales)
    for leaf in jax.tree_util.tree_leaves(comps.unet_params):
        assert np.std(np.asarray(leaf)) > 0.01
    ids, ctx, eps, img = _run_all(comps)
    assert ids.shape == (3, 77) and ctx.shape == (3, 77, 32)
    assert eps.shape == (3, 8, 8, 4) and img.shape == (3, 16, 16, 3)
    for a in (ctx, eps, img):
        assert bool(jnp.isfinite(a).all()) and float(jnp.std(a)) > 1e-3
    assert float(jnp.abs(ctx[0] - ctx[1]).max()) > 1e-3  # prompts matter


def test_seed_changes_params_and_overrides_apply(tmp_path):
    a = sd_random.random_components("tiny", seed=0, components=("unet",))
    b = sd_random.random_components("tiny", seed=1, components=("unet",))
    assert not _leaves_equal(a.unet_params, b.unet_params)
    assert _leaves_equal(a.unet_params, sd_random.random_components("tiny", seed=0, components=("unet",)).unet_params)
    assert a.vae is None and a.text_encoder_params is None and a.tokenizer is None and a.schedule is None
    folder = sd_random.write_random_pipeline(
        str(tmp_path / "sd2"), unet_overrides={"use_linear_projection": True, "attention_head_dim": (2, 4),
                                                "upcast_attention": True,
                                                "down_block_types": ["CrossAttnDownBlock2D"] * 2,
                                                "up_block_types": ["CrossAttnUpBlock2D"] * 2},
        scheduler_overrides={"prediction_type": "v_prediction"})
    comps = load_components(folder)
    assert comps.unet.use_linear_projection and comps.unet.attention_head_dim == (2, 4)
    assert comps.schedule.prediction_type == "v_prediction"
    _run_all(comps, batch=2)


def test_byte_level_tokenizer_fallback_without_open_clip(tmp_path, monkeypatch):
    from sfd_jax.sd import tokenizer as sd_tokenizer

    def missing():
        raise FileNotFoundError("open_clip is not installed")
    monkeypatch.setattr(sd_tokenizer, "default_bpe_path", missing)
    folder = sd_random.write_random_pipeline(str(tmp_path / "p"), seed=1)
    config = json.load(open(os.path.join(folder, "text_encoder", "config.json")))
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (514, 512, 513)
    comps = load_components(folder)
    ids, *_ = _run_all(comps, batch=2)
    assert ids[0, 0] == 512 and ids.max() == 513 and len(set(ids[0].tolist())) > 5
    # random_components draws the same parameters for the same vocabulary
    mem = sd_random.random_components("tiny", seed=1, components=("text_encoder",))
    assert _leaves_equal(mem.text_encoder_params, comps.text_encoder_params)


def test_sd15_in_memory_text_encoder_and_schedule():
    """The real SD 1.5 configs, in memory (the text encoder only: 123M parameters; the UNet's shapes are checked in
    test_sd_models)."""
    comps = sd_random.random_components("sd15", components=("text_encoder", "scheduler", "tokenizer"), tokenizer=True,
                                        dtype=jnp.bfloat16)
    assert comps.unet is None and comps.path == ""
    assert sum(x.size for x in jax.tree_util.tree_leaves(comps.text_encoder_params)) == 123_060_480
    assert comps.text_encoder.dtype == jnp.bfloat16
    assert float(comps.schedule.alphas_cumprod[625]) == pytest.approx(0.137769, abs=1e-6)
    ids = tokenize(comps.tokenizer, PROMPTS[:2])
    out = jax.jit(comps.text_encoder.apply)({"params": comps.text_encoder_params}, jnp.asarray(ids))
    assert out.last_hidden_state.shape == (2, 77, 768)
    assert bool(jnp.isfinite(out.last_hidden_state.astype(jnp.float32)).all())
    configs = sd_random.component_configs("sd15")
    assert configs["unet"]["block_out_channels"] == [320, 640, 1280, 1280] and configs["vae"]["sample_size"] == 512
    with pytest.raises(ValueError, match="unknown size"):
        sd_random.component_configs("sdxl")


def test_cli_writes_a_pipeline_and_reports_bad_input(tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("sfd_jax.sd.random_pipeline", "--out", str(out), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "wrote a random tiny" in last_line(proc.stdout)
    ref = sd_random.random_components("tiny", seed=3, components=("vae",))
    assert _leaves_equal(load_components(str(out), components=("vae",)).vae_params, ref.vae_params)
    bad = tmp_path / "file"
    bad.write_text("x")
    proc = run_cli("sfd_jax.sd.random_pipeline", "--out", str(bad))
    assert proc.returncode == 2 and last_line(proc.stderr).startswith("sfd_jax.sd.random_pipeline: error: --out")
    proc = run_cli("sfd_jax.sd.random_pipeline")
    assert proc.returncode == 2 and "--out is required" in proc.stderr


# ----------------------------------------------------------------------------------------------- diffusers
@pytest.mark.torch
def test_diffusers_loads_the_folder_and_matches_our_modules(tiny):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    comps = load_components(tiny)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.steps_offset == 1
    ids, ctx, eps, img = _run_all(comps)
    ref_ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                             return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, ref_ids)
    x = np.array(jax.random.normal(jax.random.key(0), (3, 8, 8, 4)))
    with torch.no_grad():
        ref_ctx = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state
        ref_eps = pipe.unet(torch.from_numpy(nchw(x)), torch.tensor([1, 500, 999]), ref_ctx).sample.numpy()
        ref_img = pipe.vae.decode(torch.from_numpy(nchw(x)) / pipe.vae.config.scaling_factor).sample.numpy()
    assert max_err(ctx, ref_ctx.numpy()) <= 1e-4
    assert max_err(nchw(eps), ref_eps) <= 1e-4
    assert max_err(nchw(img), ref_img) <= 1e-4
