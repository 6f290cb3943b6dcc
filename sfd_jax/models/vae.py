"""Stable Diffusion's ``AutoencoderKL`` in Flax linen, NHWC.

Numerics follow PyTorch ``diffusers.AutoencoderKL``; the parameter tree is the one of the former
``diffusers.FlaxAutoencoderKL`` (``encoder/down_blocks_0/resnets_0``, ``encoder/mid_block/attentions_0/query``,
``quant_conv``, ``post_quant_conv``, ``decoder/up_blocks_0/upsamplers_0/conv``, ...).

Images are ``[B, H, W, 3]`` in [-1, 1]; latents ``[B, H/8, W/8, 4]`` (for SD's 4-level VAE). ``encode`` returns the
diagonal Gaussian's ``(mean, logvar)`` with logvar clamped to [-30, 20] as diffusers does; the diffusion model
works on ``latents = sample * scaling_factor`` and ``decode`` expects ``latents / scaling_factor`` (see
:func:`encode_to_latents` / :func:`decode_latents`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfd_jax.models.attention import check_implementation, dot_product_attention
from sfd_jax.models.hf_config import UnsupportedConfigError, parse_config
from sfd_jax.models.sd_unet import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

Dtype = Any
VAE_EPS = 1e-6


class AttentionBlock(nn.Module):
    """The VAE mid-block's single-head spatial self-attention (diffusers' ``Attention`` with group norm and a
    residual connection); Flax names group_norm/query/key/value/proj_attn."""
    channels: int
    groups: int = 32
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = group_norm(self.groups, VAE_EPS, self.dtype, "group_norm")(x).reshape(b, h * w, 1, c)
        dense = lambda name: nn.Dense(self.channels, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = dense("query")(y), dense("key")(y), dense("value")(y)
        out = dot_product_attention(q, k, v, implementation=self.attention_impl)
        return dense("proj_attn")(out.reshape(b, h, w, c)) + x


class MidBlock2D(nn.Module):
    channels: int
    groups: int = 32
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        res = dict(groups=self.groups, eps=VAE_EPS, dtype=self.dtype)
        x = ResnetBlock2D(self.channels, name="resnets_0", **res)(x)
        if self.add_attention:
            x = AttentionBlock(self.channels, self.groups, self.dtype, self.attention_impl, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, name="resnets_1", **res)(x)


class DownEncoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    add_downsample: bool
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, vae_padding=True, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    add_upsample: bool
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        x = conv(self.block_out_channels[0], self.dtype, "conv_in")(x)
        n = len(self.block_out_channels)
        for i, ch in enumerate(self.block_out_channels):
            x = DownEncoderBlock2D(ch, self.layers_per_block, i < n - 1, self.groups, self.dtype,
                                   name=f"down_blocks_{i}")(x)
        x = MidBlock2D(self.block_out_channels[-1], self.groups, self.mid_block_add_attention, self.dtype,
                       self.attention_impl, name="mid_block")(x)
        x = nn.silu(group_norm(self.groups, VAE_EPS, self.dtype, "conv_norm_out")(x))
        return conv(self.out_channels, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, z):
        x = conv(self.block_out_channels[-1], self.dtype, "conv_in")(z)
        x = MidBlock2D(self.block_out_channels[-1], self.groups, self.mid_block_add_attention, self.dtype,
                       self.attention_impl, name="mid_block")(x)
        n = len(self.block_out_channels)
        for i, ch in enumerate(reversed(self.block_out_channels)):
            x = UpDecoderBlock2D(ch, self.layers_per_block + 1, i < n - 1, self.groups, self.dtype,
                                 name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(self.groups, VAE_EPS, self.dtype, "conv_norm_out")(x))
        return conv(self.out_channels, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """``apply(..., x, method='encode') -> (mean, logvar)``; ``apply(..., z, method='decode') -> image``;
    ``__call__(x, rng=None)`` encodes, takes the mean (or a sample with ``rng``) and decodes (used for init)."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",) * 4
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",) * 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    CONFIG_FIELDS = {k: k for k in (
        "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
        "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
        "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")}
    CONFIG_OFF_VALUES = {"act_fn": ("silu",), "shift_factor": (None, 0, 0.0), "latents_mean": (None,),
                         "latents_std": (None,)}
    # force_upcast only says whether diffusers runs this VAE in fp32 under an fp16 pipeline; ours follows `dtype`
    CONFIG_INFORMATIONAL = ("force_upcast",)

    @classmethod
    def from_config(cls, config: dict, *, what: str = "vae/config.json", **kwargs) -> "AutoencoderKL":
        fields = parse_config(config, what=what, fields=cls.CONFIG_FIELDS, off_values=cls.CONFIG_OFF_VALUES,
                              informational=cls.CONFIG_INFORMATIONAL)
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            for name in fields.get(key, ()):
                if name != want:
                    raise UnsupportedConfigError(
                        f"{what}: unsupported block type {name!r} in {key} (sfd_jax implements {want})")
        return cls(**fields, **kwargs)

    def setup(self):
        check_implementation(self.attention_impl)
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      dtype=self.dtype, attention_impl=self.attention_impl)
        self.encoder = Encoder(2 * self.latent_channels, **common)
        self.decoder = Decoder(self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, self.dtype, None, kernel=1)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, self.dtype, None, kernel=1)

    def encode(self, x):
        """[B, H, W, in] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out] (roughly [-1, 1])."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, rng: jax.Array | None = None):
        mean, logvar = self.encode(x)
        z = mean if rng is None else sample_latent(mean, logvar, rng)
        return self.decode(z)

    def init_params(self, rng: jax.Array, size: int | None = None):
        f = 2 ** (len(self.block_out_channels) - 1)
        s = size or f
        return self.init(rng, jnp.zeros((1, s, s, self.in_channels), jnp.float32))["params"]


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian: mean + exp(logvar/2) * N(0, 1)."""
    std = jnp.exp(0.5 * logvar.astype(jnp.float32))
    return mean.astype(jnp.float32) + std * jax.random.normal(rng, mean.shape, jnp.float32)


def encode_to_latents(vae: AutoencoderKL, params, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Images [-1, 1] -> diffusion latents (mean, or a sample with ``rng``) times ``scaling_factor``, float32."""
    mean, logvar = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
    z = mean.astype(jnp.float32) if rng is None else sample_latent(mean, logvar, rng)
    return z * vae.scaling_factor


def decode_latents(vae: AutoencoderKL, params, latents: jax.Array) -> jax.Array:
    """Diffusion latents -> images (float32, roughly [-1, 1]): ``decode(latents / scaling_factor)``."""
    z = latents.astype(jnp.float32) / vae.scaling_factor
    return vae.apply({"params": params}, z, method=AutoencoderKL.decode).astype(jnp.float32)
