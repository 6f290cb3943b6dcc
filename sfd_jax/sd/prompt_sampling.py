"""Images for a list of prompts, batched and sharded: the teacher (DDIM + classifier-free guidance) and the
one-/k-step generator of SFD.

Noise: image i of a call with ``seed`` starts from ``normal(fold_in(key(seed), i), latent_shape)``, so an image
depends only on (prompt, seed, i), not on the batch size or the device count. Prompts are tokenised by the
caller's ``tokenize(list[str]) -> int32 [N, 77]``; images come back float32 [N, H, W, C] in roughly [-1, 1].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax import parallel


class _Batched:
    def __init__(self, comps, mesh, *, tokenize, latent_shape, batch: int = 256):
        self.comps, self.mesh, self.tokenize = comps, mesh, tokenize
        self.latent_shape = tuple(latent_shape)
        div = parallel.batch_divisor(mesh)
        self.batch = int(math.ceil(batch / div) * div)
        self.shard, self.repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
        self._frozen = None

    def _frozen_params(self):
        if self._frozen is None:
            self._frozen = jax.device_put((self.comps.vae_params, self.comps.text_encoder_params), self.repl)
        return self._frozen

    def sample(self, unet_params, prompts: list[str], seed: int = 0, progress: bool = False) -> np.ndarray:
        """Images float32 [len(prompts), H, W, C] (see the module docstring)."""
        from tqdm.auto import tqdm
        ids = self.tokenize(list(prompts))
        n = len(ids)
        key = jax.random.key(int(seed))
        draw = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), self.latent_shape,
                                                            jnp.float32)))
        vae_p, te_p = self._frozen_params()
        out = []
        for lo in tqdm(range(0, n, self.batch), desc=type(self).__name__, disable=not progress, leave=False):
            hi = min(lo + self.batch, n)
            b = min(self.batch, int(math.ceil((hi - lo) / parallel.batch_divisor(self.mesh))
                                    * parallel.batch_divisor(self.mesh)))
            chunk = np.concatenate([ids[lo:hi], np.repeat(ids[hi - 1:hi], b - (hi - lo), 0)])
            noise = jax.device_put(draw(jnp.arange(lo, lo + b)), self.shard)
            imgs = self._fn(unet_params, vae_p, te_p, noise, jax.device_put(chunk, self.shard), jnp.int32(seed))
            out.append(np.asarray(jax.device_get(imgs))[: hi - lo])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


class TeacherSampler(_Batched):
    """DDIM ``steps`` with guidance ``uncond + w·(cond − uncond)`` (uncond = "") from the teacher UNet."""

    def __init__(self, comps, mesh, *, steps: int, guidance: float, tokenize, latent_shape, batch: int = 256):
        super().__init__(comps, mesh, tokenize=tokenize, latent_shape=latent_shape, batch=batch)
        from sfd_jax.models.clip_text import text_embeddings
        from sfd_jax.models.vae import decode_latents
        from sfd_jax.sd.generator import cfg_guided_eps
        from sfd_jax.sd.scheduler import ddim_sample
        unet, vae, te, schedule = comps.unet, comps.vae, comps.text_encoder, comps.schedule
        empty = jnp.asarray(tokenize([""]))

        def fn(unet_p, vae_p, te_p, noise, ids, seed):
            cond = text_embeddings(te, te_p, ids)
            uncond = jnp.broadcast_to(text_embeddings(te, te_p, empty), cond.shape)
            latents = ddim_sample(lambda x, t: cfg_guided_eps(unet, unet_p, x, t, cond, uncond, guidance), noise,
                                  schedule, steps)
            return decode_latents(vae, vae_p, latents)

        self._fn = jax.jit(fn)


class GeneratorSampler(_Batched):
    """The SFD generator: ``num_steps`` generator steps from t_init (:func:`sfd_jax.sd.generator.generate_latents`;
    re-noising for k > 1 from ``fold_in(key(seed), i)``), then the VAE."""

    def __init__(self, comps, mesh, *, t_init: int, tokenize, latent_shape, num_steps: int = 1, batch: int = 256):
        super().__init__(comps, mesh, tokenize=tokenize, latent_shape=latent_shape, batch=batch)
        from sfd_jax.models.clip_text import text_embeddings
        from sfd_jax.models.vae import decode_latents
        from sfd_jax.sd.generator import generate_latents
        unet, vae, te = comps.unet, comps.vae, comps.text_encoder
        ac = np.asarray(comps.schedule.alphas_cumprod, np.float32)

        def fn(unet_p, vae_p, te_p, noise, ids, seed):
            emb = text_embeddings(te, te_p, ids)
            z = generate_latents(unet, unet_p, noise, emb, ac, int(t_init), int(num_steps), jax.random.key(seed))
            return decode_latents(vae, vae_p, z)

        self._fn = jax.jit(fn)
