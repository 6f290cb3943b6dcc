"""Diffusion math shared by training and sampling
(README: "The original release and our differences" › DDPM sampling, DDPM distillation).

Conventions: images are NHWC in data space [-1, 1]; timesteps are integers 0..T-1 (float inside the network);
``alphas_cumprod`` (ā) is a float32 vector of length T, bit-identical to the original's.
An *eps function* is ``eps_fn(x_t: [B,H,W,C], t: [B] float) -> eps: [B,H,W,C]``; labels, guidance and network
parameters are bound into it by the caller (:func:`class_conditional_eps_fn` for the DDPM world).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

BETA_SCHEDULES = ("quad", "linear", "const", "jsd", "sigmoid")
SAMPLERS = ("one_step", "ddim", "ddpm")
SKIP_TYPES = ("uniform", "quad")


# ------------------------------------------------------------------------------------------------ schedules
def get_beta_schedule(beta_schedule: str, *, beta_start: float, beta_end: float,
                      num_diffusion_timesteps: int) -> np.ndarray:
    """The original's five beta schedules, computed in float64 (cast to float32 by the caller)."""
    t = num_diffusion_timesteps
    if beta_schedule == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, t, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, t, dtype=np.float64)
    elif beta_schedule == "const":
        betas = beta_end * np.ones(t, dtype=np.float64)
    elif beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(t, 1, t, dtype=np.float64)
    elif beta_schedule == "sigmoid":
        betas = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, t))) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")
    assert betas.shape == (t,)
    return betas


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """ā = cumprod(1 − β) as the original computes it: β cast to float32, 1 − β in float32, then torch's
    float32 ``cumprod``, which on CPU keeps a float64 running product and rounds each output to float32.
    Bit-identical to torch (a float32 running product differs by up to 3e-7)."""
    alphas = 1.0 - betas.astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def schedule_from_config(config) -> tuple[np.ndarray, np.ndarray]:
    """(betas float32 [T], alphas_cumprod float32 [T]) from the ``diffusion.*`` config keys."""
    d = config.diffusion
    betas = get_beta_schedule(d.beta_schedule, beta_start=d.beta_start, beta_end=d.beta_end,
                              num_diffusion_timesteps=d.num_diffusion_timesteps)
    return betas.astype(np.float32), alphas_cumprod_from_betas(betas)


def _bcast(v: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1, 1, 1))


def add_noise(x0: jax.Array, t: jax.Array, noise: jax.Array, alphas_cumprod: jax.Array) -> jax.Array:
    """x_t = √ā_t x0 + √(1-ā_t) ε. x0, noise: [B,H,W,C]; t: [B] int."""
    a = _bcast(jnp.asarray(alphas_cumprod)[t])
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def eps_to_x0(x_t: jax.Array, eps: jax.Array, abar: jax.Array) -> jax.Array:
    """x0 = (x_t - √(1-ā) ε) / √ā. abar: [B] (or scalar)."""
    a = _bcast(jnp.asarray(abar)) if jnp.ndim(abar) else abar
    return (x_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)


def x0_to_eps(x_t: jax.Array, x0: jax.Array, abar: jax.Array) -> jax.Array:
    """ε = (x_t - √ā x0) / √(1-ā). abar: [B] (or scalar)."""
    a = _bcast(jnp.asarray(abar)) if jnp.ndim(abar) else abar
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


# --------------------------------------------------------------------------------------- guidance / eps_fn
def guided_eps(eps_cond: jax.Array, eps_uncond: jax.Array, scale: float) -> jax.Array:
    """The original DDPM guidance: (1+s)·cond − s·uncond (s = 0: no guidance; weight w = 1+s)."""
    return (1.0 + scale) * eps_cond - scale * eps_uncond


def class_conditional_eps_fn(apply_fn: Callable, params, labels: jax.Array, cond_scale: float = 0.0,
                             *, drop_mask: jax.Array | None = None, train: bool = False,
                             rng: jax.Array | None = None) -> EpsFn:
    """Bind parameters, labels [B], guidance scale and a null-class mask into an eps function of a
    :class:`ConditionalUNet`.

    ``cond_scale`` must be a Python float. With cond_scale != 0 the conditional pass (with ``drop_mask``) and the
    all-null pass run as one batch of 2B (the same numbers as two passes in eval mode) and are combined as
    (1+s)·cond − s·uncond. ``train=True`` enables dropout (needs ``rng``).
    """
    rngs = {"dropout": rng} if train else None
    if cond_scale == 0.0:
        def eps_fn(x_t, t):
            return apply_fn({"params": params}, x_t, t, labels, drop_mask=drop_mask, train=train, rngs=rngs)
        return eps_fn

    b = labels.shape[0]
    cond_drop = jnp.zeros((b,), bool) if drop_mask is None else drop_mask.astype(bool)
    drop = jnp.concatenate([cond_drop, jnp.ones((b,), bool)])

    def eps_fn(x_t, t):
        out = apply_fn({"params": params}, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                       jnp.concatenate([labels, labels]), drop_mask=drop, train=train, rngs=rngs)
        return guided_eps(out[:b], out[b:], cond_scale)
    return eps_fn


# ------------------------------------------------------------------------------------------------- samplers
def one_step_coefficients(alphas_cumprod, t_init: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init_a, init_b, init_sigma) = (√ā, √(1−ā), √(1/ā − 1)) at t_init, in float32."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t_init]
    return jnp.sqrt(a), jnp.sqrt(1.0 - a), jnp.sqrt(1.0 / a - 1.0)


def generator_sample(eps_fn: EpsFn, z: jax.Array, t_init: int, alphas_cumprod) -> jax.Array:
    """The one-step generator map x0 = x_t/init_a − init_sigma·ε(x_t, t_init) with x_t = init_b·z.

    Mathematically x0 = init_sigma·(z − ε(init_b·z, t_init)); written like the original for bit-closeness.
    z: [B,H,W,C] standard normal. No clamping: x0 lives in data space but is not clipped.
    """
    init_a, init_b, init_sigma = one_step_coefficients(alphas_cumprod, t_init)
    x_t = init_b * z
    eps = eps_fn(x_t, jnp.full((z.shape[0],), t_init, jnp.float32))
    return x_t / init_a - init_sigma * eps


def timestep_sequence(skip_type: str, steps: int, num_timesteps: int) -> np.ndarray:
    """Visited timesteps, increasing: 'uniform' = range(0, T, T//steps); 'quad' = int(linspace(0, √(0.8T))²)."""
    if steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if skip_type == "uniform":
        return np.arange(0, num_timesteps, num_timesteps // steps, dtype=np.int32)
    if skip_type == "quad":
        seq = np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2
        return np.array([int(s) for s in seq], dtype=np.int32)
    raise ValueError(f"unknown skip type {skip_type!r}; expected one of {SKIP_TYPES}")


def _step_pairs(seq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(t, t_next) pairs in sampling order (decreasing t); t_next = −1 after the last step."""
    seq_next = np.concatenate([[-1], seq[:-1]])
    return jnp.asarray(seq[::-1].copy(), jnp.int32), jnp.asarray(seq_next[::-1].copy(), jnp.int32)


def _abar_ext(alphas_cumprod) -> jax.Array:
    """ā with ā_{−1} := 1 prepended; index with t + 1."""
    return jnp.concatenate([jnp.ones((1,), jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32)])


def _scan_steps(update: Callable, eps_fn: EpsFn, x_T: jax.Array, seq: np.ndarray, alphas_cumprod,
                rng: jax.Array) -> jax.Array:
    """``x ← update(x, eps, t, ā_t, ā_next, noise)`` over ``seq`` in sampling order (decreasing t; ā_{−1} = 1 after
    the last step), eps = ``eps_fn(x, t)`` and noise ~ N(0, I) from ``fold_in(rng, i)`` at step i."""
    ts, ts_next = _step_pairs(seq)
    ab = _abar_ext(alphas_cumprod)
    b = x_T.shape[0]

    def body(x, inp):
        k, t, t_next = inp
        eps = eps_fn(x, jnp.full((b,), t, jnp.float32))
        noise = jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
        return update(x, eps, t, ab[t + 1], ab[t_next + 1], noise), None

    x, _ = jax.lax.scan(body, x_T, (jnp.arange(ts.shape[0]), ts, ts_next))
    return x


def ddim_sample(eps_fn: EpsFn, x_T: jax.Array, seq: np.ndarray, alphas_cumprod, *, eta: float,
                rng: jax.Array) -> jax.Array:
    """DDIM with stochasticity eta (the original's 'generalized' sampler; eta=1 is DDPM-like, eta=0 deterministic).

    x_T: [B,H,W,C] standard normal; seq: increasing int timesteps (:func:`timestep_sequence`). No x0 clipping.
    """
    def update(x, eps, t, at, at_next, noise):
        x0 = eps_to_x0(x, eps, at)
        c1 = eta * jnp.sqrt((1.0 - at / at_next) * (1.0 - at_next) / (1.0 - at))
        c2 = jnp.sqrt((1.0 - at_next) - c1 ** 2)
        return jnp.sqrt(at_next) * x0 + c1 * noise + c2 * eps
    return _scan_steps(update, eps_fn, x_T, seq, alphas_cumprod, rng)


def ddpm_sample(eps_fn: EpsFn, x_T: jax.Array, seq: np.ndarray, alphas_cumprod, *, rng: jax.Array) -> jax.Array:
    """Ancestral DDPM over ``seq`` (the math the original's broken ``ddpm_noisy`` path intended).

    β_t = 1 − ā_t/ā_prev; x0 = √(1/ā)x − √(1/ā − 1)ε clipped to [−1, 1] (the original's form of x̂₀, kept for its
    rounding); mean = (√ā_prev β_t x0 + √(1−β_t)(1−ā_prev) x)/(1−ā_t); x ← mean + √β_t·N(0, I), no noise at t = 0.
    """
    def update(x, eps, t, at, atm1, noise):
        beta_t = 1.0 - at / atm1
        x0 = jnp.clip(jnp.sqrt(1.0 / at) * x - jnp.sqrt(1.0 / at - 1.0) * eps, -1.0, 1.0)
        mean = (jnp.sqrt(atm1) * beta_t * x0 + jnp.sqrt(1.0 - beta_t) * (1.0 - atm1) * x) / (1.0 - at)
        mask = (t != 0).astype(x.dtype)
        return mean + mask * jnp.exp(0.5 * jnp.log(beta_t)) * noise
    return _scan_steps(update, eps_fn, x_T, seq, alphas_cumprod, rng)


def run_sampler(sampler: str, eps_fn: EpsFn, x_T: jax.Array, alphas_cumprod, *, rng: jax.Array, t_init: int,
                steps: int = 100, skip: str = "uniform", eta: float = 0.0) -> jax.Array:
    """Dispatch to one of :data:`SAMPLERS`. x_T: [B,H,W,C] N(0,I) noise -> samples in data space (unclamped)."""
    if sampler == "one_step":
        return generator_sample(eps_fn, x_T, t_init, alphas_cumprod)
    seq = timestep_sequence(skip, steps, int(np.shape(alphas_cumprod)[0]))
    if sampler == "ddim":
        return ddim_sample(eps_fn, x_T, seq, alphas_cumprod, eta=eta, rng=rng)
    if sampler == "ddpm":
        return ddpm_sample(eps_fn, x_T, seq, alphas_cumprod, rng=rng)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
