"""Noise-schedule math for Stable Diffusion: scaled_linear betas, add_noise, x0/eps/v conversions, classifier-free
guidance and DDIM (README: "The original release and our differences" › SD distillation).

Conventions: latents are NHWC float32; timesteps are integers 0..T-1; ``alphas_cumprod`` (ā) is float32 [T],
bit-identical to ``diffusers.DDPMScheduler(beta_schedule='scaled_linear')`` (betas = linspace(√β0, √β1, T)² in
float32, ā = cumprod(1 − β) as torch computes it). For SD 1.5 at t = 625: ā = 0.137769.

Differences from the original: ``clip_sample`` is always off (the original relied on the SD 1.5 scheduler config
saying so, while diffusers' DDPMScheduler defaults to clipping); v-prediction is implemented and tested (the
original's v-prediction path is broken;
README: "The original release and our differences" › Known bugs of the original and what we do).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.ddpm.diffusion import alphas_cumprod_from_betas
from sfd_jax.models.hf_config import UnsupportedConfigError, parse_config

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit (CPU): float32 step, the first half
    counted up from ``start`` and the second half down from ``end``, each value ``start + step*i`` rounded once
    (torch's kernel uses a fused multiply-add; float64 arithmetic then one rounding gives the same values)."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps)
    up = np.float64(start32) + np.float64(step) * i
    down = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def scaled_linear_betas(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> np.ndarray:
    """SD's betas: linspace(√β_start, √β_end, T)², float32, as diffusers."""
    root = torch_linspace_f32(beta_start ** 0.5, beta_end ** 0.5, steps)
    return (root * root).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SDSchedule:
    """The scheduler settings an SD pipeline's ``scheduler/scheduler_config.json`` holds (PNDM, DDIM, DDPM, ...),
    as far as they define the noise process and DDIM's timestep grid."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    timestep_spacing: str = "leading"

    FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset",
              "set_alpha_to_one", "timestep_spacing")
    OFF_VALUES = {"trained_betas": (None,), "thresholding": (False,), "rescale_betas_zero_snr": (False,),
                  "timestep_type": ("discrete",)}
    # sampler-specific options of the scheduler classes SD ships with; they do not define the noise process.
    # clip_sample: ignored on purpose (always off, see the module docstring).
    INFORMATIONAL = ("skip_prk_steps", "clip_sample", "clip_sample_range", "variance_type", "sample_max_value",
                     "dynamic_thresholding_ratio", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas", "interpolation_type", "sigma_min", "sigma_max", "final_sigmas_type",
                     "lower_order_final", "solver_order", "algorithm_type", "solver_type", "euler_at_final",
                     "lambda_min_clipped", "use_lu_lambdas")

    @classmethod
    def from_config(cls, config: dict, what: str = "scheduler/scheduler_config.json") -> "SDSchedule":
        kwargs = parse_config(config, what=what, fields={k: k for k in cls.FIELDS}, off_values=cls.OFF_VALUES,
                              informational=cls.INFORMATIONAL)
        out = cls(**kwargs)
        if out.beta_schedule not in ("scaled_linear", "linear"):
            raise UnsupportedConfigError(
                f"{what}: unsupported config key 'beta_schedule' = {out.beta_schedule!r} (scaled_linear or linear)")
        if out.prediction_type not in PREDICTION_TYPES:
            raise UnsupportedConfigError(f"{what}: unsupported config key 'prediction_type' = {out.prediction_type!r}")
        if out.timestep_spacing not in TIMESTEP_SPACINGS:
            raise UnsupportedConfigError(
                f"{what}: unsupported config key 'timestep_spacing' = {out.timestep_spacing!r}")
        return out

    @property
    def betas(self) -> np.ndarray:
        if self.beta_schedule == "scaled_linear":
            return scaled_linear_betas(self.beta_start, self.beta_end, self.num_train_timesteps)
        return torch_linspace_f32(self.beta_start, self.beta_end, self.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return alphas_cumprod_from_betas(self.betas)

    @property
    def final_alpha_cumprod(self) -> np.float32:
        """ā used after the last DDIM step: 1 (set_alpha_to_one) or ā_0 (SD's configs)."""
        return np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def ddim_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """diffusers' ``DDIMScheduler.set_timesteps``: int64 timesteps in sampling (decreasing) order."""
        n, t = num_inference_steps, self.num_train_timesteps
        if not 1 <= n <= t:
            raise ValueError(f"num_inference_steps must be in [1, {t}], got {n}")
        if self.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (t // n)).round()[::-1].copy().astype(np.int64) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(t, 0, -t / n)).astype(np.int64) - 1
        else:
            ts = np.linspace(0, t - 1, n).round()[::-1].copy().astype(np.int64)
        return ts


# ------------------------------------------------------------------------------------------------ math
def _abar(alphas_cumprod, t) -> jax.Array:
    """ā_t broadcast to NHWC: t is [B] (or scalar) ints."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(t)]
    return a.reshape(a.shape + (1, 1, 1)) if a.ndim == 1 else a


def add_noise(x0: jax.Array, noise: jax.Array, t, alphas_cumprod) -> jax.Array:
    """x_t = √ā_t·x0 + √(1−ā_t)·noise (diffusers' ``add_noise``)."""
    a = _abar(alphas_cumprod, t)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def get_velocity(x0: jax.Array, noise: jax.Array, t, alphas_cumprod) -> jax.Array:
    """The v-prediction target v = √ā_t·noise − √(1−ā_t)·x0 (diffusers' ``get_velocity``)."""
    a = _abar(alphas_cumprod, t)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def pred_original_sample(model_output: jax.Array, x_t: jax.Array, t, alphas_cumprod,
                         prediction_type: str = "epsilon") -> jax.Array:
    """x0 from the network output: eps -> (x_t − √(1−ā)ε)/√ā; v -> √ā·x_t − √(1−ā)·v; sample -> itself."""
    a = _abar(alphas_cumprod, t)
    if prediction_type == "epsilon":
        return (x_t - jnp.sqrt(1.0 - a) * model_output) / jnp.sqrt(a)
    if prediction_type == "v_prediction":
        return jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def pred_epsilon(model_output: jax.Array, x_t: jax.Array, t, alphas_cumprod,
                 prediction_type: str = "epsilon") -> jax.Array:
    """ε from the network output: eps -> itself; v -> √ā·v + √(1−ā)·x_t; sample -> (x_t − √ā·x0)/√(1−ā)."""
    a = _abar(alphas_cumprod, t)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return jnp.sqrt(a) * model_output + jnp.sqrt(1.0 - a) * x_t
    if prediction_type == "sample":
        return (x_t - jnp.sqrt(a) * model_output) / jnp.sqrt(1.0 - a)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def guided(out_uncond: jax.Array, out_cond: jax.Array, scale) -> jax.Array:
    """SD classifier-free guidance: uncond + w·(cond − uncond); w = 1 is no guidance."""
    return out_uncond + scale * (out_cond - out_uncond)


def ddim_step(model_output: jax.Array, t, t_prev, x_t: jax.Array, alphas_cumprod, final_alpha_cumprod,
              prediction_type: str = "epsilon") -> tuple[jax.Array, jax.Array]:
    """One deterministic DDIM step (eta = 0) as ``diffusers.DDIMScheduler.step``: returns (x_{t_prev}, x0).

    ``t_prev < 0`` uses ``final_alpha_cumprod``. No clipping or thresholding.
    """
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    t_prev = jnp.asarray(t_prev)
    a_prev = jnp.where(t_prev >= 0, ac[jnp.maximum(t_prev, 0)], jnp.float32(final_alpha_cumprod))
    a_prev = a_prev.reshape(a_prev.shape + (1, 1, 1)) if a_prev.ndim == 1 else a_prev
    x0 = pred_original_sample(model_output, x_t, t, alphas_cumprod, prediction_type)
    eps = pred_epsilon(model_output, x_t, t, alphas_cumprod, prediction_type)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, x0


def ddim_sample(model_fn: Callable[[jax.Array, jax.Array], jax.Array], x_T: jax.Array, schedule: SDSchedule,
                num_inference_steps: int) -> jax.Array:
    """Deterministic DDIM from x_T (= N(0, 1) latents; SD's init_noise_sigma is 1) to x0.

    ``model_fn(x_t, t [B] int32) -> output`` in the schedule's prediction type (bind the text embeddings and
    guidance into it, e.g. with :func:`guided`). Runs as one ``lax.scan``.
    """
    ts = schedule.ddim_timesteps(num_inference_steps)
    stride = schedule.num_train_timesteps // num_inference_steps
    prev = ts - stride
    ac = jnp.asarray(schedule.alphas_cumprod)
    final = schedule.final_alpha_cumprod
    b = x_T.shape[0]

    def body(x, inp):
        t, tp = inp
        out = model_fn(x, jnp.full((b,), t, jnp.int32)).astype(jnp.float32)
        x, _ = ddim_step(out, jnp.full((b,), t), jnp.full((b,), tp), x, ac, final, schedule.prediction_type)
        return x, None

    x, _ = jax.lax.scan(body, x_T.astype(jnp.float32), (jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32)))
    return x
