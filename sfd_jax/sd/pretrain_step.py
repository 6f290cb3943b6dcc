"""The pure text-to-image (latent diffusion) training step of ``mode='sd_pretrain'``.

``step(state: PretrainState, frozen, batch, root_key) -> (PretrainState, metrics)``:

1. the frozen VAE's posterior of each image, (mean, logvar) [B, h, w, 4] (computed once for the data set by the
   trainer: encoding is as costly as the UNet step for a small UNet) -> a sample of it, times the VAE's
   ``scaling_factor`` (latents z0, float32);
2. captions -> rows of the text table ``frozen["table"]`` [N, 77, D] (the frozen CLIP text encoder's embeddings
   of every caption the data set can produce, computed once by the trainer; row 0 is ""); with probability
   ``caption_dropout`` a sample's row becomes 0 (the unconditional text classifier-free guidance needs);
3. t ~ U{0..T−1}, ε ~ N(0, I), x_t = √ā_t·z0 + √(1−ā_t)·ε; the loss is the mean over B·h·w·4 of (ε̂ − ε)²
   (ε-prediction, as SD; the mean of :func:`sfd_jax.distill.losses.denoising_loss`'s per-sample sums);
4. gradients (fp32), optax update (global-norm clipping + Adam/AdamW), EMA of the UNet weights with
   ``ema_rate`` (shadow ← rate·shadow + (1−rate)·param).

Randomness comes from ``fold_in(root_key, state.step)`` and is drawn at the global batch shape under the batch
sharding, so 1 and N devices compute the same step and a resumed run repeats an uninterrupted one.
``frozen``: {"table": float32 [N, 77, D]}.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sfd_jax.distill.losses import denoising_loss
from sfd_jax.distill.state import PretrainState, ema_update
from sfd_jax.models.vae import sample_latent
from sfd_jax.sd.generator import unet_eps


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    batch: int
    caption_dropout: float = 0.1
    ema_rate: float = 0.999
    num_train_timesteps: int = 1000
    sample_posterior: bool = True      # a posterior sample of the VAE (as SD), else its mean


def make_pretrain_optimizer(lr: float, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                            weight_decay: float = 0.0, grad_clip: float = 1.0) -> optax.GradientTransformation:
    """clip_grad_norm_(grad_clip) (0: off) then Adam (AdamW when ``weight_decay`` > 0)."""
    opt = (optax.adamw(lr, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay) if weight_decay > 0
           else optax.adam(lr, b1=beta1, b2=beta2, eps=eps))
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip > 0 else opt


def make_sd_pretrain_step(unet, scaling_factor: float, alphas_cumprod, s: PretrainSettings,
                          tx: optax.GradientTransformation, *,
                          batch_sharding: jax.sharding.Sharding | None = None) -> Callable:
    """The pure step (module docstring). ``batch``: {"mean", "logvar": float32 [B,h,w,4], "rows": int32 [B]}."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)

    def constrain(x):
        return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

    def loss_fn(params, frozen, batch, key):
        mean, rows = batch["mean"], batch["rows"]
        b = mean.shape[0]
        k_post, k_drop, k_t, k_eps = jax.random.split(key, 4)
        z0 = sample_latent(mean, batch["logvar"], k_post) if s.sample_posterior else mean
        z0 = jax.lax.stop_gradient(constrain(z0 * scaling_factor))
        drop = constrain(jax.random.uniform(k_drop, (b,)) < s.caption_dropout)
        emb = frozen["table"][jnp.where(drop, 0, rows)]
        t = constrain(jax.random.randint(k_t, (b,), 0, s.num_train_timesteps))
        noise = constrain(jax.random.normal(k_eps, z0.shape, jnp.float32))
        per = denoising_loss(lambda x_t, tt: unet_eps(unet, params, x_t, tt, emb), z0, t, noise, ac)
        return jnp.mean(per) / (z0[0].size), per

    def step(state: PretrainState, frozen, batch, root_key):
        key = jax.random.fold_in(root_key, state.step)
        frozen = jax.lax.stop_gradient(frozen)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
        updates, opt = tx.update(grads, state.opt, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, s.ema_rate)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return PretrainState(step=state.step + 1, params=params, ema=ema, opt=opt), metrics

    return step
