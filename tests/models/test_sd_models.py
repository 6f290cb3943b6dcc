"""Shape-level facts about our SD modules (no torch, no weights): the real SD 1.5 / 2.1 configs give diffusers'
parameter counts, config keys we do not implement are errors, the attention switch explains itself."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.models.clip_text import CLIPTextModel
from sfd_jax.models.hf_config import UnsupportedConfigError
from sfd_jax.models.sd_unet import UNet2DConditionModel
from sfd_jax.models.vae import AutoencoderKL
from tests.sd_configs import CLIP_VIT_L14_TEXT, SD15_UNET, SD21_UNET, SD_VAE


def _count(module) -> int:
    shapes = jax.eval_shape(lambda: module.init_params(jax.random.key(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("config, expected", [(SD15_UNET, 859_520_964), (SD21_UNET, 865_910_724)],
                         ids=["sd15", "sd21"])
def test_unet_parameter_count_equals_diffusers(config, expected):
    assert _count(UNet2DConditionModel.from_config(config)) == expected


def test_vae_parameter_count_equals_diffusers():
    assert _count(AutoencoderKL.from_config(SD_VAE)) == 83_653_863


def test_clip_vit_l14_text_parameter_count_equals_transformers():
    assert _count(CLIPTextModel.from_config(CLIP_VIT_L14_TEXT)) == 123_060_480


def test_parameter_tree_uses_the_former_flax_names():
    shapes = jax.eval_shape(lambda: UNet2DConditionModel.from_config(SD15_UNET).init_params(jax.random.key(0)))
    attn = shapes["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert set(attn) == {"attn1", "attn2", "ff", "norm1", "norm2", "norm3"}
    assert set(attn["attn1"]) == {"to_q", "to_k", "to_v", "to_out_0"}
    assert attn["ff"]["net_0"]["proj"]["kernel"].shape == (320, 2560)
    assert shapes["time_embedding"]["linear_1"]["kernel"].shape == (320, 1280)
    assert shapes["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (1, 1, 320, 320)
    vae = jax.eval_shape(lambda: AutoencoderKL.from_config(SD_VAE).init_params(jax.random.key(0)))
    assert set(vae["encoder"]["mid_block"]["attentions_0"]) == {"group_norm", "query", "key", "value", "proj_attn"}
    clip = jax.eval_shape(lambda: CLIPTextModel.from_config(CLIP_VIT_L14_TEXT).init_params(jax.random.key(0)))
    assert clip["text_model"]["encoder"]["layers"]["11"]["self_attn"]["q_proj"]["kernel"].shape == (768, 768)


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
                                        ("resnet_time_scale_shift", "scale_shift"), ("a_new_key", 1)])
def test_unsupported_unet_config_key_is_an_error_naming_it(key, value):
    with pytest.raises(UnsupportedConfigError, match=repr(key)):
        UNet2DConditionModel.from_config({**SD15_UNET, key: value})


def test_unsupported_vae_and_clip_config_keys_are_errors():
    with pytest.raises(UnsupportedConfigError, match="'latents_mean'"):
        AutoencoderKL.from_config({**SD_VAE, "latents_mean": [0.1, 0.2, 0.3, 0.4]})
    with pytest.raises(UnsupportedConfigError, match="'hidden_act'"):
        CLIPTextModel.from_config({**CLIP_VIT_L14_TEXT, "hidden_act": "relu"})
    with pytest.raises(UnsupportedConfigError, match="'attention_bias'"):
        CLIPTextModel.from_config({**CLIP_VIT_L14_TEXT, "attention_bias": True})


def test_attention_implementations():
    from sfd_jax.models.attention import dot_product_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32) for _ in range(3))
    ref = jax.nn.dot_product_attention(q, k, v)
    assert np.allclose(dot_product_attention(q, k, v), ref, atol=1e-6)
    assert np.allclose(dot_product_attention(q, k, v, implementation="auto"), ref, atol=1e-6)  # falls back
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="not one of"):
        dot_product_attention(q, k, v, implementation="flash")
