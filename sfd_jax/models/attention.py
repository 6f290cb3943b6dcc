"""The one attention entry point of the Stable Diffusion models (UNet, VAE, CLIP text encoder).

Every SD attention calls :func:`dot_product_attention`, a thin layer over ``jax.nn.dot_product_attention`` whose
``implementation`` is one switch:

- ``'xla'``: portable, any dtype and head size; logits and softmax are computed in float32 whatever the input
  dtype (so diffusers' ``upcast_attention``/``upcast_softmax`` hold automatically).
- ``'cudnn'``: cuDNN flash attention (CUDA GPUs only; bfloat16/float16 inputs; head size a multiple of 8 and at
  most 128; no explicit mask). Asking for it where it cannot run is an error that says why.
- ``'auto'``: cuDNN where those conditions hold for this call, else XLA (SD 1.5's 160-wide heads and fp32 runs
  fall back silently; the short 77-token cross-attention runs on cuDNN too when it qualifies).

Layout: ``q: [B, T, N, H]``, ``k, v: [B, S, N, H]`` (batch, sequence, heads, head size) -> ``[B, T, N, H]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "auto")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    return implementation


def _cudnn_problem(q: jax.Array, mask) -> str | None:
    """Why cuDNN flash attention cannot run this call here (None when it can)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return f"it needs a CUDA GPU and this process runs on {backend}"
    if q.dtype not in _CUDNN_DTYPES:
        return f"it needs bfloat16 or float16 inputs, got {q.dtype} (set the model's compute dtype)"
    head = q.shape[-1]
    if head % 8 or head > 128:
        return f"it needs a head size that is a multiple of 8 and at most 128, got {head}"
    if mask is not None:
        return "it takes no explicit mask here (padding masks need 'xla')"
    return None


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          is_causal: bool = False, implementation: str = "xla") -> jax.Array:
    """Scaled dot-product attention with scale ``1/sqrt(H)``.

    q: [B, T, N, H]; k, v: [B, S, N, H]; mask: optional bool, broadcastable to [B, N, T, S] (True = attend).
    Returns [B, T, N, H] in q's dtype.
    """
    impl = check_implementation(implementation)
    if impl != "xla":
        problem = _cudnn_problem(q, mask)
        if problem is None:
            impl = "cudnn"
        elif impl == "cudnn":
            raise ValueError(f"attention implementation 'cudnn' cannot run: {problem}; use 'xla' or 'auto'")
        else:
            impl = "xla"
    k = k.astype(q.dtype)
    v = v.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, N*H] -> [B, T, N, H]."""
    return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, T, N*H]."""
    return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
