"""GroupNorm as ``torch.nn.GroupNorm`` computes it (two-pass variance, statistics in fp32), faster on XLA:CPU.

``GroupNorm`` has exactly the parameters of ``flax.linen.GroupNorm`` (``scale`` [C], ``bias`` [C]), so checkpoints
and converters are unchanged. Input [B, ..., C] (channels last, e.g. NHWC); groups are contiguous channel blocks.

On the CPU backend the sums over positions are written as a contraction with a vector of ones (``dot_general``, a
matrix-vector product XLA:CPU hands to Eigen) instead of a reduction over the spatial axes and the within-group
channels at once, which is what ``flax.linen.GroupNorm`` does and what XLA:CPU runs slowly (``python -m
sfd_jax.bench --pieces`` times it; the README's benchmark section has the step before and after). Other backends
reduce with ``jnp.sum``. Both compute the same sums in another order (fp32 rounding apart).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _sum_positions(x: jax.Array, on_cpu: bool) -> jax.Array:
    """x [B, N, C] -> [B, C], the sum over the N positions."""
    if on_cpu:
        return lax.dot_general(x, jnp.ones((x.shape[1],), x.dtype), (((1,), (0,)), ((), ())))
    return jnp.sum(x, axis=1)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float,
               on_cpu: bool | None = None) -> jax.Array:
    """y = (x - mean_g) / sqrt(var_g + eps) * scale + bias, mean and (biased, two-pass) variance over the positions
    and the C/groups channels of each group. x [B, ..., C]; scale, bias [C]; returns x's shape in fp32."""
    if on_cpu is None:
        on_cpu = jax.default_backend() == "cpu"
    b, c = x.shape[0], x.shape[-1]
    if c % groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {groups} groups")
    per = c // groups
    xr = x.astype(jnp.float32).reshape(b, -1, c)                        # [B, N, C]
    n = xr.shape[1] * per

    def per_channel(v):                                                 # [B, G] -> [B, 1, C]
        return jnp.repeat(v, per, axis=1)[:, None, :]

    mean = _sum_positions(xr, on_cpu).reshape(b, groups, per).sum(-1) / n
    d = xr - per_channel(mean)
    var = _sum_positions(d * d, on_cpu).reshape(b, groups, per).sum(-1) / n
    y = d * (per_channel(lax.rsqrt(var + eps)) * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.reshape(x.shape)


class GroupNorm(nn.Module):
    """Drop-in for ``nn.GroupNorm(num_groups, epsilon, use_fast_variance=False, dtype)`` (same parameters)."""
    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)
