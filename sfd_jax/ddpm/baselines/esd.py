"""ESD, Erasing Concepts from Diffusion Models (Gandikota et al. 2023), for the class-conditional DDPM
(README: "The original release and our differences" › Baselines).

A trainable copy θ and a frozen copy θ₀ of the pretrained model. One step (:func:`make_esd_step`):

1. t_enc ~ U{0, ..., S−1} (S = ``unlearn.ddim_steps``, 50), one per step.
2. A partial DDIM trajectory of the trainable model for the forgotten class K (guidance s =
   ``unlearn.cond_scale``, ``unlearn.eta``, no gradient): from pure noise at the top of the S-step uniform
   schedule 0, T/S, ..., down to timestep t_enc·T/S, so x carries that noise level.
3. t ~ U[round(t_enc·T/S), round((t_enc+1)·T/S)) per sample.
4. The frozen model's negatively guided target ε* = ε₀(x, t, ∅) − η·(ε₀(x, t, K) − ε₀(x, t, ∅)), η =
   ``unlearn.negative_guidance`` (7.5).
5. L = mean over all elements of (ε_θ(x, t, K) − ε*)² (dropout on), then global-norm clipping, Adam, EMA.

Where we differ from the original: the optimizer steps after the backward pass with this step's gradient (the
original stepped before the backward pass and never zeroed gradients, so every update applied the running sum of
all earlier gradients, one step late); the trajectory ends at the noise level at which it is scored (the original
indexed a trajectory built over ``range(0, t_enc, T // timesteps)``); the batch may exceed 1 (one t_enc per step,
t per sample).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfd_jax.ddpm import diffusion
from sfd_jax.ddpm.baselines.common import apply_gradients, constrainer, forget_label
from sfd_jax.distill.state import PretrainState


def esd_schedule(config) -> np.ndarray:
    """The S-step uniform DDIM schedule 0, T/S, ..., int32 [S]."""
    T, S = int(config.diffusion.num_diffusion_timesteps), int(config.unlearn.ddim_steps)
    if not 1 <= S <= T:
        raise ValueError(f"unlearn.ddim_steps must be in [1, {T}], got {S}")
    return np.arange(0, T, T // S, dtype=np.int32)[:S]


def partial_ddim(eps_fn, x, seq: jax.Array, stop_index, alphas_cumprod, *, eta: float, rng):
    """DDIM from x at timestep seq[-1] down to seq[stop_index] (len(seq)−1−stop_index steps; stop_index may be
    traced). x: [B,H,W,C]; returns x at noise level seq[stop_index]."""
    S, b = seq.shape[0], x.shape[0]
    ac = jnp.asarray(alphas_cumprod, jnp.float32)

    def body(i, x):
        j = S - 1 - i
        t, t_next = seq[j], seq[j - 1]
        at, at_next = ac[t], ac[t_next]
        eps = eps_fn(x, jnp.full((b,), t, jnp.float32))
        x0 = (x - eps * jnp.sqrt(1.0 - at)) / jnp.sqrt(at)
        c1 = eta * jnp.sqrt((1.0 - at / at_next) * (1.0 - at_next) / (1.0 - at))
        c2 = jnp.sqrt((1.0 - at_next) - c1 ** 2)
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        return jnp.sqrt(at_next) * x0 + c1 * noise + c2 * eps

    return jax.lax.fori_loop(0, S - 1 - stop_index, body, x)


def esd_target(eps_cond: jax.Array, eps_uncond: jax.Array, negative_guidance: float) -> jax.Array:
    """ε* = ε(∅) − η·(ε(c) − ε(∅)): the frozen model's prediction guided away from the class."""
    return eps_uncond - negative_guidance * (eps_cond - eps_uncond)


def esd_loss(model, params, frozen, x, t, labels, negative_guidance: float, rng=None) -> jax.Array:
    """mean over all elements of (ε_θ(x, t, c) − ε*)², ε* = :func:`esd_target` of the frozen model (no gradient).
    x: [B,H,W,C]; t: [B] float; labels: [B]; ``rng``: dropout key of the trainable pass (None: eval mode)."""
    b = x.shape[0]
    out = model.apply({"params": jax.lax.stop_gradient(frozen)}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                      jnp.concatenate([labels, labels]),
                      drop_mask=jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)]))
    target = jax.lax.stop_gradient(esd_target(out[:b], out[b:], negative_guidance))
    pred = model.apply({"params": params}, x, t, labels, train=rng is not None,
                       rngs=None if rng is None else {"dropout": rng})
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def make_esd_step(model, config, alphas_cumprod, tx: optax.GradientTransformation, *, batch_size: int,
                  batch_sharding=None):
    """``step(state: PretrainState, frozen θ₀, root_key) -> (state, metrics)``: the ESD step of the module
    docstring (no data is read)."""
    u = config.unlearn
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    T = int(config.diffusion.num_diffusion_timesteps)
    seq = jnp.asarray(esd_schedule(config))
    S = int(seq.shape[0])
    B, K = int(batch_size), forget_label(config)
    res, ch = int(config.data.image_size), int(config.model.in_channels)
    ng, cs, eta = float(u.negative_guidance), float(u.cond_scale), float(u.eta)
    ema_rate = float(config.model.ema_rate)
    constrain = constrainer(batch_sharding)

    def step(state: PretrainState, frozen, root_key):
        k_enc, k_x, k_traj, k_t, k_do = jax.random.split(jax.random.fold_in(root_key, state.step), 5)
        c = constrain(jnp.full((B,), K, jnp.int32))
        t_enc = jax.random.randint(k_enc, (), 0, S)
        x_T = constrain(jax.random.normal(k_x, (B, res, res, ch), jnp.float32))
        traj_fn = diffusion.class_conditional_eps_fn(model.apply, jax.lax.stop_gradient(state.params), c, cs)
        x = jax.lax.stop_gradient(partial_ddim(traj_fn, x_T, seq, t_enc, ac, eta=eta, rng=k_traj))
        lo = jnp.round(t_enc * T / S).astype(jnp.int32)
        hi = jnp.round((t_enc + 1) * T / S).astype(jnp.int32)
        t = constrain(jax.random.randint(k_t, (B,), lo, hi)).astype(jnp.float32)

        def loss_fn(p):
            return esd_loss(model, p, frozen, x, t, c, ng, rng=k_do)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        new = apply_gradients(state, grads, tx, ema_rate)
        return new, {"loss": loss, "t_enc": t_enc.astype(jnp.float32), "grad_norm": optax.global_norm(grads)}

    return step
