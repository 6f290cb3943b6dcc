"""Our SD modules, loaded by load_components from pipelines diffusers/transformers saved, against the PyTorch
models themselves (fp32, tiny random configs): max abs error <= 1e-4."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sd_testutil import make_pipeline, max_err, nchw

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOL = 1e-4


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd1"))
    return folder, make_pipeline(folder, "sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd2"))
    return folder, make_pipeline(folder, "sd2", hidden_act="gelu", prediction_type="v_prediction", seed=5)


def _unet_inputs(seed=0, batch=2, size=8, tokens=9, dim=32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    t = np.array([3, 981][:batch], np.int64)
    ctx = rng.standard_normal((batch, tokens, dim)).astype(np.float32)
    return x, t, ctx


def _check_unet(folder, pipe, **load_kwargs):
    from sfd_jax.sd.pipeline import load_components

    comps = load_components(folder, components=("unet", "scheduler"), **load_kwargs)
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    out = jax.jit(comps.unet.apply)({"params": comps.unet_params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    err = max_err(nchw(out), ref)
    assert err <= TOL, err
    return comps


def test_unet_sd1_style_matches_diffusers(sd1):
    _check_unet(*sd1)


def test_unet_sd2_style_linear_projection_per_block_heads_upcast_matches_diffusers(sd2):
    folder, pipe = sd2
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.upcast_attention
    comps = _check_unet(folder, pipe)
    assert comps.unet.attention_head_dim == (2, 4)
    assert comps.schedule.prediction_type == "v_prediction"


def test_unet_remat_keeps_parameter_tree_and_output(sd1):
    from sfd_jax.sd.pipeline import load_components

    folder, _ = sd1
    plain = load_components(folder, components=("unet",))
    remat = load_components(folder, components=("unet",), remat=True)
    assert jax.tree_util.tree_structure(plain.unet_params) == jax.tree_util.tree_structure(remat.unet_params)
    x, t, ctx = _unet_inputs(batch=1)
    a = jax.jit(plain.unet.apply)({"params": plain.unet_params}, x, t, ctx)
    b = jax.jit(remat.unet.apply)({"params": remat.unet_params}, x, t, ctx)
    assert max_err(a, b) < 1e-5


def test_vae_encode_and_decode_match_diffusers(sd1):
    from sfd_jax.models.vae import AutoencoderKL
    from sfd_jax.sd.pipeline import load_components

    folder, pipe = sd1
    comps = load_components(folder, components=("vae",))
    rng = np.random.default_rng(1)
    img = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        dist = pipe.vae.encode(torch.from_numpy(nchw(img))).latent_dist
        dec = pipe.vae.decode(torch.from_numpy(nchw(z))).sample.numpy()
    variables = {"params": comps.vae_params}
    mean, logvar = comps.vae.apply(variables, jnp.asarray(img), method=AutoencoderKL.encode)
    assert max_err(nchw(mean), dist.mean.numpy()) <= TOL
    assert max_err(nchw(jnp.exp(0.5 * logvar)), dist.std.numpy()) <= TOL
    out = comps.vae.apply(variables, jnp.asarray(z), method=AutoencoderKL.decode)
    assert max_err(nchw(out), dec) <= TOL
    assert comps.vae.scaling_factor == pytest.approx(0.18215)


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_clip_text_encoder_matches_transformers(which, request):
    """sd1's encoder uses quick_gelu, sd2's gelu; last hidden state, pooled output and the penultimate layer."""
    from sfd_jax.models.clip_text import text_embeddings
    from sfd_jax.sd.pipeline import load_components
    from sfd_jax.sd.tokenizer import tokenize

    folder, pipe = request.getfixturevalue(which)
    comps = load_components(folder, components=("text_encoder", "tokenizer"))
    assert comps.text_encoder.hidden_act == ("quick_gelu" if which == "sd1" else "gelu")
    ids = tokenize(comps.tokenizer, ["a photo of a cat", "", "an astronaut riding a horse on the moon"])
    with torch.no_grad():
        ref = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        ref_pen = pipe.text_encoder.final_layer_norm(ref.hidden_states[-2]).numpy()
    out = comps.text_encoder.apply({"params": comps.text_encoder_params}, jnp.asarray(ids))
    assert max_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= TOL
    assert max_err(out.pooled, ref.pooler_output.numpy()) <= TOL
    pen = text_embeddings(comps.text_encoder, comps.text_encoder_params, jnp.asarray(ids), skip_layers=1)
    assert max_err(pen, ref_pen) <= TOL


def test_flax_msgpack_written_from_our_params_loads_identically(sd1, tmp_path):
    """A pipeline whose components hold only flax_model.msgpack (flax.serialization.to_bytes of our params, the
    former diffusers/transformers Flax format) loads to the same parameters."""
    import shutil

    from flax import serialization

    from sfd_jax.sd.pipeline import load_components

    folder, _ = sd1
    ref = load_components(folder, components=("unet", "vae", "text_encoder"))
    copy = tmp_path / "msgpack"
    shutil.copytree(folder, copy)
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        os.remove(copy / comp / f"{stem}.safetensors")
        params = jax.device_get(getattr(ref, f"{comp}_params"))
        (copy / comp / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
    got = load_components(str(copy), components=("unet", "vae", "text_encoder"))
    for comp in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, f"{comp}_params"), getattr(got, f"{comp}_params")
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_fp16_variant_loads_upcast_to_fp32(sd1, tmp_path):
    """variant='fp16' reads diffusion_pytorch_model.fp16.safetensors; parameters come back float32."""
    from sfd_jax.sd.pipeline import load_components

    folder, pipe = sd1
    out = tmp_path / "fp16"
    pipe.save_pretrained(out, variant="fp16", safe_serialization=True)
    # keep only the fp16 files, to be sure they are what is read
    for comp, stem in (("unet", "diffusion_pytorch_model"),):
        fp16 = out / comp / f"{stem}.fp16.safetensors"
        assert fp16.exists()
    comps = load_components(str(out), variant="fp16", components=("unet",))
    leaves = jax.tree_util.tree_leaves(comps.unet_params)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


def test_bfloat16_compute_stays_close(sd1):
    from sfd_jax.sd.pipeline import load_components

    folder, pipe = sd1
    comps = load_components(folder, dtype=jnp.bfloat16, components=("unet",))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(comps.unet_params))
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    out = jax.jit(comps.unet.apply)({"params": comps.unet_params}, x, t, ctx)
    assert out.dtype == jnp.bfloat16
    assert max_err(nchw(out.astype(jnp.float32)), ref) < 0.1 * np.abs(ref).max()
