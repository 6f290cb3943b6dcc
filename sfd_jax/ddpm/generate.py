"""Batched, sharded image generation with a class-conditional DDPM network (any of the three samplers).

The host loop feeds fixed-size batches (the last one padded), so each sampler compiles once; every batch is
split over the mesh's batch axes and the parameters are replicated. Initial noise is drawn per sample from
``fold_in(key(seed), sample_index)``, so the images do not depend on the batch size or the device count.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sfd_jax import parallel
from sfd_jax.ddpm import diffusion


class DDPMSampler:
    """``sampler(params, noise [B,H,W,C], labels [B], rng) -> images [B,H,W,C]`` (data space, unclamped).

    ``param_shardings`` (a sharding or a pytree of them) says how ``params`` arrive; default replicated.
    """

    def __init__(self, model, alphas_cumprod: np.ndarray, *, sampler: str, t_init: int, steps: int = 100,
                 skip: str = "uniform", eta: float = 0.0, cond_scale: float = 0.0, mesh=None,
                 param_shardings=None):
        if sampler not in diffusion.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(diffusion.SAMPLERS)}")
        if sampler != "one_step":
            diffusion.timestep_sequence(skip, steps, len(alphas_cumprod))  # validate early
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        ac = jnp.asarray(alphas_cumprod, jnp.float32)
        cond_scale = float(cond_scale)

        def run(params, noise, labels, rng):
            eps_fn = diffusion.class_conditional_eps_fn(model.apply, params, labels, cond_scale)
            return diffusion.run_sampler(sampler, eps_fn, noise, ac, rng=rng, t_init=t_init, steps=steps,
                                         skip=skip, eta=eta)

        repl, batch = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        # Parameters: replicated by default; training passes its FSDP shardings so grids need no reshard.
        p_sh = repl if param_shardings is None else param_shardings
        self._run = jax.jit(run, in_shardings=(p_sh, batch, batch, repl), out_shardings=batch)
        self._noise = jax.jit(_per_sample_noise, static_argnums=(2,), in_shardings=(repl, batch),
                              out_shardings=batch)

    def __call__(self, params, noise, labels, rng):
        return self._run(params, noise, labels, rng)

    def noise(self, key: jax.Array, sample_ids: np.ndarray, shape: tuple[int, int, int]) -> jax.Array:
        """Standard normal [len(ids), *shape], sample i drawn from fold_in(key, ids[i])."""
        return self._noise(key, jnp.asarray(sample_ids, jnp.int32), tuple(shape))

    def batch_multiple(self) -> int:
        return parallel.batch_divisor(self.mesh)


def _per_sample_noise(key, ids, shape):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(ids)


def generate(sampler: DDPMSampler, params, labels: np.ndarray, *, image_shape: tuple[int, int, int],
             batch_size: int, seed: int, noise: np.ndarray | None = None, progress: bool = True) -> np.ndarray:
    """Generate ``len(labels)`` images [N, H, W, C] float32 (data space, unclamped) in batches.

    ``noise`` [N, H, W, C] replays given initial noise; otherwise it is drawn per sample from ``seed``.
    """
    n = len(labels)
    mult = sampler.batch_multiple()
    bs = max(mult, -(-min(batch_size, max(n, 1)) // mult) * mult)   # round up to a multiple of the shards
    noise_key, step_key = jax.random.split(jax.random.key(seed))
    out = np.zeros((n,) + tuple(image_shape), np.float32)
    batches = range(0, n, bs)
    for b_idx, start in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=not progress or len(batches) < 2)):
        stop = min(start + bs, n)
        pad = bs - (stop - start)
        ids = np.arange(start, start + bs)
        lab = np.concatenate([labels[start:stop], np.zeros(pad, labels.dtype)]).astype(np.int32)
        if noise is None:
            x = sampler.noise(noise_key, ids, image_shape)
        else:
            x = np.concatenate([noise[start:stop], np.zeros((pad,) + tuple(image_shape), np.float32)])
        imgs = sampler(params, x, lab, jax.random.fold_in(step_key, b_idx))
        out[start:stop] = np.asarray(jax.device_get(imgs))[: stop - start]
    return out
