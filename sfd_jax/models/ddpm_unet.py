"""The original class-conditional DDPM UNet, layer for layer, in Flax linen
(README: "The original release and our differences" › DDPM network).

Layout is NHWC throughout. Submodule names mirror the original PyTorch ``state_dict`` names with ``.`` between
indices replaced by ``_`` (``down.1.block.0.conv1.weight`` lives at ``params['down_1_block_0']['conv1']['kernel']``),
so the converter in :mod:`sfd_jax.convert.ddpm` is a mechanical rename plus layout transposes.

Difference from the original: the class-embedding width fed to every ResNet block is ``4*ch`` (the original
hard-codes 512, so only ``ch=128`` runs there). At ``ch=128`` the two are identical.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.models import conv
from sfd_jax.models.conv import Conv2D
from sfd_jax.models.group_norm import GroupNorm

Array = jax.Array


# ----------------------------------------------------------------------------------------------------------
# PyTorch-default initialisers (kaiming_uniform(a=sqrt(5)) weights, U(+-1/sqrt(fan_in)) biases). They only
# matter when pretraining from scratch; converted checkpoints overwrite them.
def _torch_kernel_init():
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv(features: int, in_features: int, kernel: int, name: str, dtype, strides: int = 1,
          padding: Any = "SAME", impl: str = "lax") -> Conv2D:
    return Conv2D(features, kernel, strides=strides, padding=padding, dtype=dtype, impl=impl,
                  kernel_init=_torch_kernel_init(), bias_init=_torch_bias_init(in_features * kernel * kernel),
                  name=name)


def _dense(features: int, in_features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=_torch_kernel_init(),
                    bias_init=_torch_bias_init(in_features), name=name)


def _group_norm(name: str, dtype) -> GroupNorm:
    # Exact two-pass variance, statistics in fp32: matches torch.nn.GroupNorm(32, C, eps=1e-6).
    return GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name)


def timestep_embedding(t: Array, dim: int) -> Array:
    """Sinusoidal embedding (tensor2tensor style, sin first). t: [B] float (non-integer allowed) -> [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResnetBlock(nn.Module):
    """GN-swish-conv3x3, + proj(swish([temb, cemb])), GN-swish-dropout-conv3x3, 1x1 shortcut when in != out."""
    in_ch: int
    out_ch: int
    emb_ch: int  # width of concat([temb, cemb]) = 8*ch
    dropout: float
    dtype: Any = jnp.float32
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool) -> Array:
        ci = self.conv_impl
        h = nn.swish(_group_norm("norm1", self.dtype)(x))
        h = _conv(self.out_ch, self.in_ch, 3, "conv1", self.dtype, impl=ci)(h)
        h = h + _dense(self.out_ch, self.emb_ch, "temb_cemb_proj", self.dtype)(nn.swish(emb))[:, None, None, :]
        h = nn.swish(_group_norm("norm2", self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_ch, self.out_ch, 3, "conv2", self.dtype, impl=ci)(h)
        if self.in_ch != self.out_ch:
            x = _conv(self.out_ch, self.in_ch, 1, "nin_shortcut", self.dtype, impl=ci)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v, proj_out are 1x1 convs on GN(x)."""
    ch: int
    dtype: Any = jnp.float32
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        ci = self.conv_impl
        hn = _group_norm("norm", self.dtype)(x)
        q = _conv(c, c, 1, "q", self.dtype, impl=ci)(hn).reshape(b, h * w, c)
        k = _conv(c, c, 1, "k", self.dtype, impl=ci)(hn).reshape(b, h * w, c)
        v = _conv(c, c, 1, "v", self.dtype, impl=ci)(hn).reshape(b, h * w, c)
        logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)
        return x + _conv(c, c, 1, "proj_out", self.dtype, impl=ci)(out)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then 3x3 stride-2 conv (or 2x2 average pooling without conv)."""
    ch: int
    with_conv: bool
    dtype: Any = jnp.float32
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        if self.conv_impl in ("lax", "dot1x1"):   # as the original: pad, then a VALID convolution
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return _conv(self.ch, self.ch, 3, "conv", self.dtype, strides=2, padding="VALID")(x)
        return _conv(self.ch, self.ch, 3, "conv", self.dtype, strides=2, padding=((0, 1), (0, 1)),
                     impl=self.conv_impl)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv (when with_conv)."""
    ch: int
    with_conv: bool
    dtype: Any = jnp.float32
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = _conv(self.ch, self.ch, 3, "conv", self.dtype, impl=self.conv_impl)(x)
        return x


class ConditionalUNet(nn.Module):
    """eps-prediction UNet conditioned on timestep and class.

    Call: ``apply({'params': p}, x, t, labels, drop_mask=None, train=False, rngs={'dropout': key})``
      x: [B, H, W, C] (NHWC) noisy images; t: [B] float timesteps (0..T-1, non-integers allowed);
      labels: [B] int in [0, n_classes); drop_mask: [B] bool, True = use the learned null class for that sample.
      Returns eps: [B, H, W, out_ch] in float32. Dropout is active only with ``train=True``.
    """
    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    in_channels: int = 3
    resolution: int = 32
    n_classes: int = 10
    resamp_with_conv: bool = True
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    remat: bool = False       # recompute ResNet/attention activations in the backward pass (saves memory)
    conv_impl: str = "auto"   # 'auto' | 'lax' | 'dot1x1' | 'im2col' | 'shift' (see sfd_jax.models.conv)

    @classmethod
    def from_config(cls, config, dtype: Any = None) -> "ConditionalUNet":
        """Build from an ml_collections config with the original's ``model.*``/``data.*`` keys."""
        m, d = config.model, config.data
        if dtype is None:
            dtype = jnp.dtype(config.get("dtype", "float32"))
        return cls(ch=m.ch, out_ch=m.out_ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                   attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, in_channels=m.in_channels,
                   resolution=d.image_size, n_classes=d.n_classes, resamp_with_conv=m.resamp_with_conv,
                   dtype=dtype, remat=bool(m.get("remat", False)), conv_impl=str(m.get("conv_impl", "auto")))

    def init_params(self, rng: Array, batch: int = 1) -> dict:
        """Freshly initialised parameters (PyTorch-default init)."""
        x = jnp.zeros((batch, self.resolution, self.resolution, self.in_channels), jnp.float32)
        t = jnp.zeros((batch,), jnp.float32)
        c = jnp.zeros((batch,), jnp.int32)
        return self.init({"params": rng}, x, t, c)["params"]

    @nn.compact
    def __call__(self, x: Array, t: Array, labels: Array, drop_mask: Array | None = None,
                 train: bool = False) -> Array:
        ch, dt = self.ch, self.dtype
        ci = conv.resolve(self.conv_impl)
        emb_ch = 4 * ch
        ResBlock = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock  # noqa: N806
        Attn = nn.remat(AttnBlock) if self.remat else AttnBlock  # noqa: N806
        if x.shape[1] != self.resolution or x.shape[2] != self.resolution:
            raise ValueError(f"ConditionalUNet expects {self.resolution}x{self.resolution} inputs, got "
                             f"{x.shape[1]}x{x.shape[2]}")

        # Timestep embedding.
        temb = timestep_embedding(t, ch)
        temb = _dense(emb_ch, ch, "temb_dense_0", dt)(temb)
        temb = _dense(emb_ch, emb_ch, "temb_dense_1", dt)(nn.swish(temb))

        # Class embedding; the learned null vector is mixed in before the class MLP.
        null = self.param("null_classes_emb", nn.initializers.normal(1.0), (ch,), jnp.float32)
        cls_emb = nn.Embed(self.n_classes, ch, embedding_init=nn.initializers.normal(1.0),
                           name="classes_emb")(labels)
        if drop_mask is not None:
            keep = (~drop_mask.astype(bool)).astype(jnp.float32)[:, None]
            cls_emb = keep * cls_emb + (1.0 - keep) * null[None, :]
        cemb = _dense(emb_ch, ch, "cemb_dense_0", dt)(cls_emb)
        cemb = _dense(emb_ch, emb_ch, "cemb_dense_1", dt)(nn.swish(cemb))
        emb = jnp.concatenate([temb, cemb], axis=-1).astype(dt)  # temb first, then cemb

        levels = len(self.ch_mult)
        h = _conv(ch, self.in_channels, 3, "conv_in", dt, impl=ci)(x.astype(dt))
        hs = [h]
        hs_ch = [ch]
        res = self.resolution
        cur = ch
        for i in range(levels):
            out = ch * self.ch_mult[i]
            for j in range(self.num_res_blocks):
                h = ResBlock(cur, out, 2 * emb_ch, self.dropout, dt, ci, name=f"down_{i}_block_{j}")(hs[-1], emb, train)
                cur = out
                if res in self.attn_resolutions:
                    h = Attn(cur, dt, ci, name=f"down_{i}_attn_{j}")(h)
                hs.append(h)
                hs_ch.append(cur)
            if i != levels - 1:
                hs.append(Downsample(cur, self.resamp_with_conv, dt, ci, name=f"down_{i}_downsample")(hs[-1]))
                hs_ch.append(cur)
                res //= 2

        h = hs[-1]
        h = ResBlock(cur, cur, 2 * emb_ch, self.dropout, dt, ci, name="mid_block_1")(h, emb, train)
        h = Attn(cur, dt, ci, name="mid_attn_1")(h)
        h = ResBlock(cur, cur, 2 * emb_ch, self.dropout, dt, ci, name="mid_block_2")(h, emb, train)

        for i in reversed(range(levels)):
            out = ch * self.ch_mult[i]
            for j in range(self.num_res_blocks + 1):
                skip, skip_ch = hs.pop(), hs_ch.pop()
                h = ResBlock(cur + skip_ch, out, 2 * emb_ch, self.dropout, dt, ci, name=f"up_{i}_block_{j}")(
                    jnp.concatenate([h, skip], axis=-1), emb, train)
                cur = out
                if res in self.attn_resolutions:
                    h = Attn(cur, dt, ci, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = Upsample(cur, self.resamp_with_conv, dt, ci, name=f"up_{i}_upsample")(h)
                res *= 2

        h = nn.swish(_group_norm("norm_out", dt)(h))
        h = _conv(self.out_ch, ch, 3, "conv_out", dt, impl=ci)(h)
        return h.astype(jnp.float32)


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
