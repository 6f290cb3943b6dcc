"""2-D convolutions for the DDPM UNet with a choice of implementation (``model.conv_impl``).

``Conv2D`` has exactly the parameters of ``flax.linen.Conv`` (``kernel`` [kh, kw, in, out] HWIO, ``bias`` [out]),
so checkpoints and converters do not care which implementation runs. Implementations:

  lax     ``lax.conv_general_dilated`` (what ``nn.Conv`` calls; the only one used on GPU/TPU).
  im2col  the kh·kw shifted views of the zero-padded input concatenated on channels, then one
          ``dot_general`` with the kernel reshaped to [kh·kw·in, out]. 1x1 convolutions are a plain dot.
  shift   kh·kw ``dot_general`` calls, one per kernel tap on the shifted view, summed.
  dot1x1  1x1 convolutions as a plain dot (as im2col), larger kernels with ``lax``.
  auto    ``lax`` on GPU/TPU; :data:`CPU_AUTO` on the CPU backend (the fastest measured there; today that is
          ``lax`` as well, the switch stays so that the alternatives can be re-measured per machine with
          ``--config.model.conv_impl=...``).

All of them compute the same sums (in a different order), so values agree with ``lax`` to fp32 rounding, and
their gradients are the autodiff of the same linear map.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "lax", "dot1x1", "im2col", "shift")
# What 'auto' picks on XLA:CPU. Measured (CIFAR-10 UNet forward+backward at batch 16, one process, interleaved, with
# the YNNPACK fusions off as sfd_jax.perf.CPU_XLA_FLAGS sets them): im2col, shift and dot1x1 did not beat lax
# (im2col +30-40 %, shift +30-60 %, dot1x1 within noise); per shape, dots won only for the 1x1 convolutions.
CPU_AUTO = "lax"


def resolve(impl: str, backend: str | None = None) -> str:
    """'auto' -> the implementation for ``backend`` (default: JAX's default backend)."""
    if impl not in IMPLS:
        raise ValueError(f"model.conv_impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    return CPU_AUTO if backend == "cpu" else "lax"


def _pad_hw(x, padding) -> jax.Array:
    (pt, pb), (pl, pr) = padding
    if pt == pb == pl == pr == 0:
        return x
    return jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))


def _taps(xp, kh: int, kw: int, stride: int, out_h: int, out_w: int):
    """The kh·kw shifted (strided) views of the padded input xp [B, H', W', C] -> list of [B, oh, ow, C]."""
    return [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1,
                                         xp.shape[3]), (1, stride, stride, 1))
            for i in range(kh) for j in range(kw)]


def _dot_c(x, w) -> jax.Array:
    """x [B, H, W, K] . w [K, O] -> [B, H, W, O] (contracting the channel axis)."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding=((0, 0), (0, 0)),
           impl: str = "lax") -> jax.Array:
    """NHWC x HWIO -> NHWC convolution, no bias, explicit ``padding`` ((top, bottom), (left, right)).
    ``impl`` must already be resolved (not 'auto')."""
    kh, kw, cin, cout = kernel.shape
    if impl == "dot1x1":
        impl = "im2col" if kh == kw == 1 else "lax"
    if impl == "lax":
        return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    xp = _pad_hw(x, padding)
    out_h = (xp.shape[1] - kh) // stride + 1
    out_w = (xp.shape[2] - kw) // stride + 1
    if kh == kw == 1:
        v = xp if stride == 1 else xp[:, ::stride, ::stride, :]
        return _dot_c(v[:, :out_h, :out_w, :], kernel.reshape(cin, cout))
    taps = _taps(xp, kh, kw, stride, out_h, out_w)
    if impl == "im2col":
        return _dot_c(jnp.concatenate(taps, axis=-1), kernel.reshape(kh * kw * cin, cout))
    if impl == "shift":
        w = kernel.reshape(kh * kw, cin, cout)
        out = _dot_c(taps[0], w[0])
        for k in range(1, kh * kw):
            out = out + _dot_c(taps[k], w[k])
        return out
    raise ValueError(f"unknown conv impl {impl!r}")


def _same_padding(k: int) -> tuple[int, int]:
    # flax / lax 'SAME' for stride 1: total k - 1, the extra one at the end.
    return ((k - 1) // 2, k - 1 - (k - 1) // 2)


class Conv2D(nn.Module):
    """Drop-in for ``nn.Conv(features, (k, k), strides, padding)`` with the same parameter names and shapes.

    ``padding``: 'SAME' (stride 1 only), 'VALID' or ((top, bottom), (left, right)).
    ``impl='lax'`` is ``nn.Conv`` itself (bit-identical to it); others see :func:`conv2d`.
    """
    features: int
    kernel_size: int
    strides: int = 1
    padding: Any = "SAME"
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        impl = resolve(self.impl)
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if impl == "dot1x1":
            impl = "im2col" if k == 1 else "lax"
        if impl == "lax":   # exactly nn.Conv's computation
            pad = self.padding if isinstance(self.padding, str) else tuple(tuple(p) for p in self.padding)
            y = lax.conv_general_dilated(x, kernel, (self.strides, self.strides), pad,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
        if self.padding == "SAME":
            if self.strides != 1:
                raise ValueError("Conv2D: 'SAME' padding is implemented for stride 1 only")
            pad = (_same_padding(k), _same_padding(k))
        elif self.padding == "VALID":
            pad = ((0, 0), (0, 0))
        else:
            pad = tuple(tuple(p) for p in self.padding)
        y = conv2d(x, kernel, stride=self.strides, padding=pad, impl=impl)
        return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def conv_shapes(model) -> list[dict]:
    """Every distinct convolution of a :class:`~sfd_jax.models.ddpm_unet.ConditionalUNet`: kernel, stride,
    padding, input spatial size and channels, and ``count`` (how many layers have that shape); for tests and
    benchmarks."""
    import numpy as np
    seen, out = {}, []

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, Conv2D) and context.method_name == "__call__":
            x = args[0]
            key = (mod.kernel_size, mod.strides, str(mod.padding), x.shape[1], x.shape[2], x.shape[3],
                   mod.features)
            if key not in seen:
                seen[key] = dict(kernel=mod.kernel_size, stride=mod.strides, padding=mod.padding,
                                 h=int(x.shape[1]), w=int(x.shape[2]), cin=int(x.shape[3]), cout=mod.features, count=0)
                out.append(seen[key])
            seen[key]["count"] += 1
        return next_fun(*args, **kwargs)

    r = model.resolution
    x = np.zeros((1, r, r, model.in_channels), np.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, np.zeros((1,), np.float32), np.zeros((1,), np.int32)))
    return out


__all__: Sequence[str] = ("Conv2D", "conv2d", "conv_shapes", "resolve", "IMPLS", "CPU_AUTO")
