"""load_components on bad input, teacher sampling (sample_sd) against diffusers' pipeline, export to a diffusers
folder and back, the SiD-LSG pickle import."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import last_line, run_cli
from tests.sd_testutil import make_pipeline, max_err, nchw, nhwc

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd1"))
    return folder, make_pipeline(folder, "sd1")


# ------------------------------------------------------------------------------------------- bad input
def test_folder_without_model_index_is_not_a_diffusers_layout(tmp_path):
    from sfd_jax.sd.pipeline import SDLayoutError, load_components

    (tmp_path / "unet").mkdir()
    with pytest.raises(SDLayoutError, match="not a diffusers pipeline folder: it has no model_index.json"):
        load_components(str(tmp_path))
    proc = run_cli("sfd_jax.sd.sample", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith("sfd_jax.sd.sample: error:") and "model_index.json" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_missing_component_is_named(sd1, tmp_path):
    from sfd_jax.sd.pipeline import SDLayoutError, load_components

    folder, _ = sd1
    copy = tmp_path / "p"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(SDLayoutError, match=r"component folder vae/ is missing"):
        load_components(str(copy))
    index = json.loads((copy / "model_index.json").read_text())
    del index["vae"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SDLayoutError, match="model_index.json lists no 'vae' component"):
        load_components(str(copy))
    load_components(str(copy), components=("unet",))  # the others still load


def test_unsupported_config_key_is_an_error_naming_key_and_file(sd1, tmp_path):
    from sfd_jax.models.hf_config import UnsupportedConfigError
    from sfd_jax.sd.pipeline import load_components

    folder, _ = sd1
    copy = tmp_path / "p"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "unet" / "config.json").read_text())
    cfg["class_embed_type"] = "timestep"
    (copy / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=r"unet/config.json: unsupported config key 'class_embed_type'"):
        load_components(str(copy))


def test_weights_that_do_not_fit_the_config_are_named(sd1, tmp_path):
    from sfd_jax.convert.diffusers_weights import WeightsMismatchError
    from sfd_jax.sd.pipeline import load_components

    folder, _ = sd1
    copy = tmp_path / "p"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 48
    (copy / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsMismatchError, match="attn2.to_k.weight"):
        load_components(str(copy), components=("unet",))


def test_repo_id_when_offline_is_one_clear_error(monkeypatch):
    from huggingface_hub import constants

    from sfd_jax.sd.pipeline import SDLayoutError, load_components

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SDLayoutError, match="HF_HUB_OFFLINE is set"):
        load_components("nobody-here/no-such-sd-model")


# -------------------------------------------------------------------------------------------- sampling
def test_ddim_cfg_sampler_matches_diffusers_pipeline(sd1):
    from diffusers import DDIMScheduler

    from sfd_jax.sd.sample import make_sampler
    from sfd_jax.sd.pipeline import load_components
    from sfd_jax.sd.tokenizer import tokenize

    folder, pipe = sd1
    comps = load_components(folder)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    sampler = make_sampler(comps, steps=3, guidance=7.5)
    ids = [jnp.asarray(tokenize(comps.tokenizer, [p])) for p in ("a photo of a cat", "blurry")]
    ours = sampler(comps.unet_params, comps.vae_params, comps.text_encoder_params, noise, *ids)

    ddim = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    ref_pipe = type(pipe)(**{**pipe.components, "scheduler": ddim})
    ref = ref_pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.5,
                   latents=torch.from_numpy(nchw(noise)), num_images_per_prompt=2, output_type="pt",
                   height=16, width=16).images.numpy()  # [0, 1], NCHW
    assert max_err(nhwc(ref), (np.asarray(ours) / 2 + 0.5).clip(0, 1)) < 1e-4


def test_sample_sd_cli_writes_pngs(sd1, tmp_path):
    from PIL import Image

    folder, _ = sd1
    out = tmp_path / "samples"
    proc = run_cli("sfd_jax.sd.sample", "--model", folder, "--prompt", "a photo of a cat", "--steps", "2",
                   "--n", "3", "--out", str(out), devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(os.listdir(out))
    assert names == ["00000.png", "00001.png", "00002.png", "grid.png"]
    assert Image.open(out / "00000.png").size == (16, 16)


# ---------------------------------------------------------------------------------- export and import
def test_export_round_trip_through_diffusers(sd1, tmp_path):
    """ours -> checkpoint -> export-diffusers folder -> StableDiffusionPipeline.from_pretrained UNet gives our
    outputs; load_components reads the folder back; import-diffusers gives the same parameters."""
    from diffusers import StableDiffusionPipeline

    from sfd_jax.convert.sd_checkpoints import import_diffusers_unet, save_unet_checkpoint
    from sfd_jax.sd.pipeline import load_components

    folder, _ = sd1
    comps = load_components(folder, components=("unet",))
    changed = jax.tree_util.tree_map(lambda p: p * 1.01 + 0.001, comps.unet_params)  # a "distilled" generator
    cfg = json.loads(open(os.path.join(folder, "unet", "config.json")).read())
    save_unet_checkpoint(str(tmp_path / "run"), changed, cfg, source="test", fmt="test", item="generator_ema")
    out = tmp_path / "exported"
    proc = run_cli("sfd_jax.convert", "export-diffusers", "--checkpoint", str(tmp_path / "run"), "--base", folder,
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 7, 32)).astype(np.float32)
    t = np.array([500])
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    ours = comps.unet.apply({"params": changed}, x, t, ctx)
    assert max_err(nchw(ours), ref) <= 1e-4

    back = load_components(str(out), components=("unet", "vae"))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(back.unet_params),
                                                    jax.tree_util.tree_leaves(changed)))
    step_dir = import_diffusers_unet(str(out), str(tmp_path / "imported"))
    assert step_dir.endswith(os.path.join("checkpoints", "0"))


def test_export_refuses_a_checkpoint_that_does_not_fit_the_base(sd1, tmp_path):
    from sfd_jax.convert.sd_checkpoints import export_diffusers, save_unet_checkpoint
    from sfd_jax.convert.diffusers_weights import WeightsMismatchError

    folder, _ = sd1
    save_unet_checkpoint(str(tmp_path / "run"), {"conv_in": {"kernel": np.zeros((3, 3, 4, 8), np.float32)}},
                         {}, source="test", fmt="test")
    with pytest.raises(WeightsMismatchError, match="does not fit the base UNet config"):
        export_diffusers(str(tmp_path / "run"), folder, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_sid_lsg_pickle_converts_the_ema_unet_without_running_its_code(sd1, tmp_path):
    from sfd_jax.checkpoint import Checkpointer
    from sfd_jax.convert.sd_checkpoints import import_sid_lsg
    from sfd_jax.sd.pipeline import abstract_params, load_components

    folder, pipe = sd1
    pkl = tmp_path / "batch512_cfg4.54.54.5_t625_8380_v2.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"ema": pipe.unet, "loss_fn": None}, f)

    # --trust-pickle is no longer needed (still accepted): the CLI converts with or without it.
    proc = run_cli("sfd_jax.convert", "sid-lsg", "--src", str(pkl), "--out", str(tmp_path / "cli"), "--trust-pickle")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cli" / "checkpoints" / "0").is_dir()

    step_dir = import_sid_lsg(str(pkl), str(tmp_path / "gen"))
    ref = load_components(folder, components=("unet",))
    ckpt = Checkpointer(os.path.dirname(step_dir))
    got = ckpt.restore({"generator": abstract_params(ref.unet)})["generator"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(got),
                                                    jax.tree_util.tree_leaves(ref.unet_params)))
    meta = ckpt.restore_json("meta")
    assert meta["format"] == "sid_lsg_pickle" and meta["unet_config"]["cross_attention_dim"] == 32
