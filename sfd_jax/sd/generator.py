"""The one-step (and k-step) SD generator and the guided denoiser of SFD, in latent space
(README: "The original release and our differences" › SD distillation).

Layouts: latents NHWC [B, h, w, 4] float32; text embeddings [B, 77, D]; timesteps int. The UNet is our
:class:`sfd_jax.models.sd_unet.UNet2DConditionModel`; ``alphas_cumprod`` the SD schedule's ā (float32 [1000]).

- :func:`generate_latents`: x_t = √(1−ā_t0)·z at t0 = ``t_init`` (D = 0), ε = G(x_t, t0, text), D = x̂_0.
  With ``num_steps = k > 1`` step i uses t_i = floor(t_init·(1 − i/k)) (k=2: 625, 312; k=4: 625, 468, 312, 156)
  and re-noises D with fresh noise; the generator uses no guidance.
- :func:`cfg_guided_eps`: ε of a frozen or trained UNet with SD classifier-free guidance ``uncond + w·(cond −
  uncond)`` (w = 1: one conditional pass) as one doubled batch; the unconditional text is "" or a negative prompt
  per sample. (The DDPM world's guidance, ``(1+s)·cond − s·uncond`` on eps values, is
  :func:`sfd_jax.ddpm.diffusion.guided_eps`.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.sd.scheduler import add_noise, guided, pred_original_sample


def step_timesteps(t_init: int, num_steps: int) -> list[int]:
    """The generator's timesteps: floor(t_init·(1 − i/k)) for i < k (integer arithmetic, as the original)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [int(np.floor(t_init * (1 - i / num_steps))) for i in range(num_steps)]


def unet_eps(unet, params, x_t: jax.Array, t: jax.Array, text_emb: jax.Array) -> jax.Array:
    """The UNet's ε (ε-prediction models), float32 [B,h,w,4]; ``t`` [B] or scalar int."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32).reshape(-1), (x_t.shape[0],))
    return unet.apply({"params": params}, x_t, t, text_emb).astype(jnp.float32)


def generate_latents(unet, params, z: jax.Array, text_emb: jax.Array, alphas_cumprod, t_init: int,
                     num_steps: int = 1, key: jax.Array | None = None, noise: list | None = None) -> jax.Array:
    """The SiD/SFD generator: z [B,h,w,4] (N(0,1)) and text [B,77,D] -> clean latents x̂_0 [B,h,w,4] float32.

    Steps after the first re-noise with ``noise[i-1]`` if given, else with N(0,1) drawn from ``fold_in(key, i)``.
    """
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    d = jnp.zeros_like(z, jnp.float32)
    for i, t in enumerate(step_timesteps(int(t_init), int(num_steps))):
        if i == 0:
            e = z.astype(jnp.float32)
        elif noise is not None:
            e = noise[i - 1].astype(jnp.float32)
        else:
            if key is None:
                raise ValueError("num_steps > 1 needs a key (or explicit noise) for the re-noising")
            e = jax.random.normal(jax.random.fold_in(key, i), z.shape, jnp.float32)
        x_t = add_noise(d, e, t, ac)
        eps = unet_eps(unet, params, x_t, t, text_emb)
        d = pred_original_sample(eps, x_t, t, ac)
    return d


def cfg_guided_eps(unet, params, x_t: jax.Array, t: jax.Array, cond: jax.Array, uncond: jax.Array | None,
                   scale: float) -> jax.Array:
    """ε with SD guidance: scale == 1 -> ε(cond); else ε_u + scale·(ε_c − ε_u) from one batch of 2B
    ([uncond; cond], as the original). ``uncond`` [B,77,D]: the "" embedding or negative prompts. For a
    v-prediction UNet the same combination of its outputs (diffusers guides the raw output either way)."""
    if float(scale) == 1.0:
        return unet_eps(unet, params, x_t, t, cond)
    b = x_t.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32).reshape(-1), (b,))
    out = unet_eps(unet, params, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                   jnp.concatenate([uncond, cond]))
    return guided(out[:b], out[b:], scale)
