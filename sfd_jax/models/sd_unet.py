"""Stable Diffusion's ``UNet2DConditionModel`` (SD 1.x and 2.x) in Flax linen, NHWC.

Numerically this follows the PyTorch ``diffusers.UNet2DConditionModel`` (the parity tests compare against it at
1e-4 in float32); the parameter tree is the one of the former ``diffusers.FlaxUNet2DConditionModel``
(``conv_in``, ``time_embedding/linear_1``, ``down_blocks_0/resnets_0/norm1``,
``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q``, ``.../ff/net_0/proj``, ``mid_block``,
``up_blocks_3``, ``conv_norm_out``, ``conv_out``), so its ``flax_model.msgpack`` files load unchanged.
Where that Flax port differed from PyTorch (tanh-approximate GELU in GEGLU, GroupNorm eps 1e-5 and 32 groups in
the transformer's input norm) we follow PyTorch.

Shapes: ``sample [B, H, W, C_in]`` (latents, NHWC), ``timesteps [B]`` or scalar (integers 0..999, any numeric
dtype), ``encoder_hidden_states [B, L, cross_attention_dim]`` -> ``[B, H, W, C_out]`` in the compute ``dtype``.
Parameters are float32; ``dtype`` is the compute dtype (float32 | bfloat16 | float16).

Naming quirk kept from diffusers: for SD 1.x/2.x ``attention_head_dim`` is the number of heads per block
(head size = block channels // heads), exactly as diffusers interprets it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfd_jax.models.attention import check_implementation, dot_product_attention, merge_heads, split_heads
from sfd_jax.models.group_norm import GroupNorm
from sfd_jax.models.hf_config import UnsupportedConfigError, parse_config

Dtype = Any


# ------------------------------------------------------------------------------------------------ layers
def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> GroupNorm:
    # two-pass variance (as torch) rather than E[x^2]-E[x]^2; statistics in float32 whatever the dtype.
    return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv(features: int, dtype: Dtype, name: str | None, kernel: int = 3, stride: int = 1, padding: int | None = None):
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' ``get_timestep_embedding``: [B] -> [B, dim] float32 (sin|cos, or cos|sin when flipped)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv (+ time embedding) GroupNorm-SiLU-dropout-conv, plus a 1x1 shortcut when the channel
    count changes. ``temb`` None (the VAE) means no ``time_emb_proj``."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, self.dtype, "conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=self.deterministic, name="dropout")(h)
        h = conv(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, self.dtype, "conv_shortcut", kernel=1)(x)
        return x + h


class Downsample2D(nn.Module):
    """3x3 stride-2 conv (padding 1); ``vae_padding`` is the VAE's variant (pad bottom/right by one, no padding)."""
    out_channels: int
    vae_padding: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.vae_padding:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return conv(self.out_channels, self.dtype, "conv", stride=2, padding=0)(x)
        return conv(self.out_channels, self.dtype, "conv", stride=2)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, self.dtype, "conv")(x)


class Attention(nn.Module):
    """diffusers' ``Attention`` as SD's transformer blocks use it: to_q/to_k/to_v without bias, to_out_0."""
    query_dim: int
    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        out = dot_product_attention(split_heads(q, self.heads), split_heads(k, self.heads),
                                    split_heads(v, self.heads), implementation=self.attention_impl)
        return nn.Dense(self.query_dim, dtype=self.dtype, name="to_out_0")(merge_heads(out))


class GEGLU(nn.Module):
    """proj to 2*inner, split into (hidden, gate), hidden * GELU(gate) with the exact (erf) GELU."""
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.features * 2, dtype=self.dtype, name="proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention (cross-attention when ``only_cross_attention``), cross-attention, GEGLU FF."""
    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, context):
        attn = dict(query_dim=self.dim, heads=self.heads, dim_head=self.dim_head, dtype=self.dtype,
                    attention_impl=self.attention_impl)
        h = layer_norm(1e-5, self.dtype, "norm1")(x)
        x = Attention(**attn, name="attn1")(h, context if self.only_cross_attention else None) + x
        x = Attention(**attn, name="attn2")(layer_norm(1e-5, self.dtype, "norm2")(x), context) + x
        return FeedForward(self.dim, dtype=self.dtype, name="ff")(layer_norm(1e-5, self.dtype, "norm3")(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or linear when ``use_linear_projection``), ``depth`` transformer blocks,
    proj_out, residual. x: [B, H, W, C]; context: [B, L, D]."""
    heads: int
    dim_head: int
    depth: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, x, context):
        b, hh, ww, c = x.shape
        inner = self.heads * self.dim_head
        h = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hh * ww, c))
        else:
            h = conv(inner, self.dtype, "proj_in", kernel=1)(h).reshape(b, hh * ww, inner)
        block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for d in range(self.depth):
            h = block_cls(inner, self.heads, self.dim_head, self.only_cross_attention, dtype=self.dtype,
                          attention_impl=self.attention_impl, name=f"transformer_blocks_{d}")(h, context)
        if self.use_linear_projection:
            h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hh, ww, c)
        else:
            h = conv(c, self.dtype, "proj_out", kernel=1)(h.reshape(b, hh, ww, inner))
        return h + x


# ------------------------------------------------------------------------------------------------ blocks
class _BlockOptions(nn.Module):
    """Fields shared by the UNet's blocks."""
    out_channels: int
    num_layers: int
    heads: int = 8
    transformer_depth: int = 1
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    deterministic: bool = True
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat: bool = False

    def _resnet(self, i: int):
        cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        return cls(self.out_channels, groups=self.groups, eps=self.eps, dropout=self.dropout,
                   deterministic=self.deterministic, dtype=self.dtype, name=f"resnets_{i}")

    def _transformer(self, i: int):
        return Transformer2DModel(self.heads, self.out_channels // self.heads, depth=self.transformer_depth,
                                  groups=self.groups, use_linear_projection=self.use_linear_projection,
                                  only_cross_attention=self.only_cross_attention, dtype=self.dtype,
                                  attention_impl=self.attention_impl, remat=self.remat, name=f"attentions_{i}")


class CrossAttnDownBlock2D(_BlockOptions):
    add_downsample: bool = True
    has_attention = True

    @nn.compact
    def __call__(self, x, temb, context):
        states = ()
        for i in range(self.num_layers):
            x = self._resnet(i)(x, temb)
            if self.has_attention:
                x = self._transformer(i)(x, context)
            states += (x,)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
            states += (x,)
        return x, states


class DownBlock2D(CrossAttnDownBlock2D):
    has_attention = False


class UNetMidBlock2DCrossAttn(_BlockOptions):
    @nn.compact
    def __call__(self, x, temb, context):
        x = self._resnet(0)(x, temb)
        for i in range(self.num_layers):
            x = self._transformer(i)(x, context)
            x = self._resnet(i + 1)(x, temb)
        return x


class CrossAttnUpBlock2D(_BlockOptions):
    add_upsample: bool = True
    has_attention = True

    @nn.compact
    def __call__(self, x, skips, temb, context):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1].astype(x.dtype)], axis=-1)
            skips = skips[:-1]
            x = self._resnet(i)(x, temb)
            if self.has_attention:
                x = self._transformer(i)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class UpBlock2D(CrossAttnUpBlock2D):
    has_attention = False


DOWN_BLOCKS = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
UP_BLOCKS = {"CrossAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}


def _per_block(value, n: int, what: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries for {n} down blocks")
        return tuple(value)
    return (value,) * n


# ------------------------------------------------------------------------------------------------ model
class UNet2DConditionModel(nn.Module):
    """SD 1.x / 2.x conditional UNet. Field names and defaults are diffusers' (SD 1.5's values).

    Extension point for SDXL-style extra conditioning: :meth:`time_conditioning` returns the embedding every
    resnet receives; a subclass can add to it (``add_embedding``) without touching the blocks.
    """
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | Sequence[bool] = False
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int | Sequence[int] = 2
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | Sequence[int] = 1
    attention_head_dim: int | Sequence[int] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False  # the XLA attention always computes logits/softmax in float32
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat: bool = False

    # config.json handling ---------------------------------------------------------------------------
    CONFIG_FIELDS = {k: k for k in (
        "sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
        "up_block_types", "only_cross_attention", "block_out_channels", "layers_per_block", "dropout",
        "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
        "attention_head_dim", "use_linear_projection", "upcast_attention")}
    CONFIG_OFF_VALUES = {
        "center_input_sample": (False,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "downsample_padding": (1,), "mid_block_scale_factor": (1, 1.0), "act_fn": ("silu",),
        "num_attention_heads": (None,), "dual_cross_attention": (False,), "class_embed_type": (None,),
        "addition_embed_type": (None,), "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
        "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
        "resnet_out_scale_factor": (1, 1.0), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
        "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
        "conv_in_kernel": (3,), "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
        "attention_type": ("default",), "class_embeddings_concat": (False,),
        "cross_attention_norm": (None,),
        "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "reverse_transformer_layers_per_block": (None,),
    }
    # read by diffusers only for addition_embed_type / UNetMidBlock2DSimpleCrossAttn, which we do not build
    CONFIG_INFORMATIONAL = ("addition_embed_type_num_heads", "mid_block_only_cross_attention")

    @classmethod
    def from_config(cls, config: dict, *, what: str = "unet/config.json", **kwargs) -> "UNet2DConditionModel":
        """Build from a diffusers ``config.json`` dict; a key we do not implement raises
        :class:`~sfd_jax.models.hf_config.UnsupportedConfigError` naming it."""
        fields = parse_config(config, what=what, fields=cls.CONFIG_FIELDS, off_values=cls.CONFIG_OFF_VALUES,
                              informational=cls.CONFIG_INFORMATIONAL)
        for key in ("down_block_types", "up_block_types"):
            table = DOWN_BLOCKS if key == "down_block_types" else UP_BLOCKS
            for name in fields.get(key, ()):
                if name not in table:
                    raise UnsupportedConfigError(f"{what}: unsupported block type {name!r} in {key} "
                                     f"(sfd_jax implements {', '.join(table)})")
        return cls(**fields, **kwargs)

    def init_params(self, rng: jax.Array, batch: int = 1, height: int | None = None, width: int | None = None,
                    tokens: int = 77):
        """Random parameters (use under ``jax.eval_shape`` for shapes only)."""
        size = 2 ** (len(self.block_out_channels) - 1)
        h = height or size
        w = width or size
        x = jnp.zeros((batch, h, w, self.in_channels), jnp.float32)
        ctx = jnp.zeros((batch, tokens, self.cross_attention_dim), jnp.float32)
        return self.init(rng, x, jnp.zeros((batch,), jnp.int32), ctx)["params"]

    # forward ------------------------------------------------------------------------------------------
    def time_conditioning(self, timesteps, batch: int):
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        emb = timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        return TimestepEmbedding(self.block_out_channels[0] * 4, dtype=self.dtype, name="time_embedding")(emb)

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, train: bool = False):
        check_implementation(self.attention_impl)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"{n} block_out_channels but {len(self.down_block_types)} down and "
                             f"{len(self.up_block_types)} up block types")
        heads = _per_block(self.attention_head_dim, n, "attention_head_dim")
        only_cross = _per_block(self.only_cross_attention, n, "only_cross_attention")
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        depth = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        common = dict(groups=self.norm_num_groups, eps=self.norm_eps, dropout=self.dropout, deterministic=not train,
                      use_linear_projection=self.use_linear_projection, dtype=self.dtype,
                      attention_impl=self.attention_impl, remat=self.remat)
        context = encoder_hidden_states.astype(self.dtype)

        temb = self.time_conditioning(timesteps, sample.shape[0])
        x = conv(self.block_out_channels[0], self.dtype, "conv_in")(sample.astype(self.dtype))

        skips = (x,)
        for i, (kind, ch) in enumerate(zip(self.down_block_types, self.block_out_channels)):
            x, states = DOWN_BLOCKS[kind](ch, layers[i], heads=heads[i], transformer_depth=depth[i],
                                          only_cross_attention=only_cross[i], add_downsample=i < n - 1,
                                          name=f"down_blocks_{i}", **common)(x, temb, context)
            skips += states

        x = UNetMidBlock2DCrossAttn(self.block_out_channels[-1], 1, heads=heads[-1], transformer_depth=depth[-1],
                                    name="mid_block", **common)(x, temb, context)

        rev_ch = list(reversed(self.block_out_channels))
        rev_heads, rev_layers = list(reversed(heads)), list(reversed(layers))
        rev_cross, rev_depth = list(reversed(only_cross)), list(reversed(depth))
        for i, (kind, ch) in enumerate(zip(self.up_block_types, rev_ch)):
            count = rev_layers[i] + 1
            x = UP_BLOCKS[kind](ch, count, heads=rev_heads[i], transformer_depth=rev_depth[i],
                                only_cross_attention=rev_cross[i], add_upsample=i < n - 1,
                                name=f"up_blocks_{i}", **common)(x, skips[-count:], temb, context)
            skips = skips[:-count]

        x = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(x))
        return conv(self.out_channels, self.dtype, "conv_out")(x)
