"""The SiD / SFD losses — the only place these formulas live (used by DDPM and SD alike;
README: "The original release and our differences" › DDPM distillation).

Written against *eps functions* ``eps_fn(x_t: [B,H,W,C], t: [B] float) -> eps [B,H,W,C]``; the caller binds
parameters, labels or text embeddings and guidance into them. Every loss returns one value per sample, [B], in
float32; callers take ``mean`` over the batch (the original's ``mean_B``) or weight samples.

Notation (paper / original names): ā_t = alphas_cumprod[t], aa = √ā_t, bb = √(1−ā_t);
x_t = aa·x0 + bb·ε; a network's clean-image estimate is x̂ = (x_t − bb·ε̂)/aa.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sfd_jax.ddpm.diffusion import EpsFn, eps_to_x0


def _coeffs(t: jax.Array, alphas_cumprod) -> tuple[jax.Array, jax.Array]:
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def _sum_chw(x: jax.Array) -> jax.Array:
    return jnp.sum(x.astype(jnp.float32), axis=tuple(range(1, x.ndim)))


def denoising_loss(eps_fn: EpsFn, x0: jax.Array, t: jax.Array, noise: jax.Array, alphas_cumprod) -> jax.Array:
    """ε-prediction loss per sample: sum_HWC (ε − ε̂(x_t, t))², x_t = √ā x0 + √(1−ā) ε.

    x0, noise: [B,H,W,C]; t: [B] int timesteps. Used for DDPM pretraining and for the fake-score update
    (there x0 are generator samples, under stop_gradient by the caller). Returns [B] float32.
    """
    aa, bb = _coeffs(t, alphas_cumprod)
    x_t = aa * x0 + bb * noise
    out = eps_fn(x_t, t.astype(jnp.float32))
    return _sum_chw((noise - out) ** 2)


def sid_generator_loss(teacher_eps_fn: EpsFn, fake_eps_fn: EpsFn, x0: jax.Array, t: jax.Array, noise: jax.Array,
                       alphas_cumprod, alpha: float, diffinst: bool = False) -> jax.Array:
    """The SiD generator loss per sample (``sid_g_loss_conditional``), [B] float32.

    x_t = aa·x0 + bb·ε;  p_x = teacher's x̂ (p = pretrained score),  sg_x = fake score's x̂;
    ω = max(mean_HWC |p_x − x0|, 1e-5), under stop_gradient and in float32;
      alpha == 1 or diffinst:  ℓ = sum_HWC (p_x − sg_x)·(sg_x − x0) / ω
      otherwise:               ℓ = sum_HWC (p_x − sg_x)·((p_x − x0) − α·(p_x − sg_x)) / ω.
    Gradients: x0 carries the generator's gradient; it flows through x_t into *both* networks' inputs (their
    parameters are frozen by the caller), through p_x, sg_x and the explicit x0 terms. With ``diffinst`` the
    networks run without gradient (Diff-Instruct), so only the explicit −x0 term carries it.
    For SFD's forget pass the caller binds the teacher to the override labels and the fake score to the forget
    labels.
    """
    aa, bb = _coeffs(t, alphas_cumprod)
    x_t = aa * x0 + bb * noise
    tf, abar = t.astype(jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32)[t]
    sg_x = eps_to_x0(x_t, fake_eps_fn(x_t, tf), abar)
    p_x = eps_to_x0(x_t, teacher_eps_fn(x_t, tf), abar)
    if diffinst:
        sg_x, p_x = jax.lax.stop_gradient(sg_x), jax.lax.stop_gradient(p_x)
    p_x, sg_x, x0 = p_x.astype(jnp.float32), sg_x.astype(jnp.float32), x0.astype(jnp.float32)
    omega = jax.lax.stop_gradient(
        jnp.maximum(jnp.mean(jnp.abs(p_x - x0), axis=tuple(range(1, x0.ndim)), keepdims=True), 1e-5))
    if diffinst or alpha == 1.0:
        integrand = (p_x - sg_x) * (sg_x - x0)
    else:
        integrand = (p_x - sg_x) * ((p_x - x0) - alpha * (p_x - sg_x))
    return _sum_chw(integrand / omega)
