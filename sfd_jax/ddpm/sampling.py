"""Sample from a DDPM checkpoint (an original ``.pth`` or ours): the one set-up behind ``python -m sfd_jax.sample``,
``evaluate forgetting`` and the demo.

    sampler = CheckpointSampler("runs/sfd", weights="ema")            # sampler 'auto': one_step for a generator
    images = sampler.sample(labels, batch_size=256, seed=1234)        # [N,H,W,C] float32, data space, unclamped

The network is read by :func:`sfd_jax.ddpm.networks.load_network` and replicated over the mesh; the images come from
:func:`sfd_jax.ddpm.generate.generate` (per-sample noise, so they do not depend on the batch size or device count).
"""
from __future__ import annotations

import numpy as np

from sfd_jax.cli_utils import UsageError
from sfd_jax.ddpm import diffusion
from sfd_jax.ddpm.networks import WEIGHTS

SAMPLER_CHOICES = ("auto",) + diffusion.SAMPLERS


def check_sampler_settings(sampler: str = "auto", skip: str = "uniform", weights: str = "ema") -> None:
    """UsageError for an unknown sampler, timestep spacing or weights name (before anything is loaded)."""
    if sampler not in SAMPLER_CHOICES:
        raise UsageError(f"unknown sampler {sampler!r}; expected one_step, ddim, ddpm or auto")
    if skip not in diffusion.SKIP_TYPES:
        raise UsageError(f"unknown --skip {skip!r}; expected uniform or quad")
    if weights not in WEIGHTS:
        raise UsageError(f"--weights must be ema or raw, got {weights!r}")


def resolve_sampler(sampler: str, kind: str) -> str:
    """'auto' -> one_step for a distilled checkpoint (the generator), ddim for a pretrained one."""
    if sampler == "auto":
        return "one_step" if kind == "distilled" else "ddim"
    return sampler


class CheckpointSampler:
    """One network of a checkpoint with its sampler, ready to draw images.

    ``config``: required for an original ``.pth``; replaces the config stored in our checkpoints. ``weights``
    'ema' | 'raw' picks the generator (distilled) or model (pretrained) weights. ``steps``, ``skip``, ``eta``,
    ``cond_scale`` (guidance s: (1+s)·cond − s·uncond) apply to ddim/ddpm. Attributes: ``network`` (the
    :class:`~sfd_jax.ddpm.networks.LoadedNetwork`: name, kind, step, source), ``config``, ``sampler_name``,
    ``image_shape`` (H, W, C), ``n_classes``.
    """

    def __init__(self, checkpoint, *, config=None, weights: str = "ema", sampler: str = "auto", steps: int = 100,
                 skip: str = "uniform", eta: float = 0.0, cond_scale: float = 0.0, mesh=None):
        from sfd_jax import parallel
        from sfd_jax.ddpm.generate import DDPMSampler
        from sfd_jax.ddpm.networks import load_network, t_init_of
        from sfd_jax.models.ddpm_unet import ConditionalUNet

        check_sampler_settings(sampler, skip, weights)
        mesh = parallel.make_mesh() if mesh is None else mesh
        self.network = load_network(checkpoint, config=config, weights=weights, sharding=parallel.replicated(mesh))
        self.config = cfg = self.network.config
        self.sampler_name = resolve_sampler(sampler, self.network.kind)
        n_steps = int(cfg.diffusion.num_diffusion_timesteps)
        if self.sampler_name != "one_step" and not 1 <= steps <= n_steps:
            raise UsageError(f"--steps must be in [1, {n_steps}], got {steps}")
        self.image_shape = (int(cfg.data.image_size), int(cfg.data.image_size), int(cfg.model.in_channels))
        self.n_classes = int(cfg.data.n_classes)
        _, alphas_cumprod = diffusion.schedule_from_config(cfg)
        self.sampler = DDPMSampler(ConditionalUNet.from_config(cfg), alphas_cumprod, sampler=self.sampler_name,
                                   t_init=t_init_of(cfg), steps=steps, skip=skip, eta=eta, cond_scale=cond_scale,
                                   mesh=mesh)

    def sample(self, labels: np.ndarray, *, batch_size: int | None = None, seed: int = 1234,
               noise: np.ndarray | None = None, progress: bool = True) -> np.ndarray:
        """Images [N,H,W,C] float32 (data space, unclamped) for ``labels`` [N]; ``noise`` [N,H,W,C] replays given
        initial noise. ``batch_size``: default ``config.sampling.batch_size``."""
        from sfd_jax.ddpm.generate import generate

        batch = batch_size or int(self.config.sampling.batch_size)
        return generate(self.sampler, self.network.params, np.asarray(labels), image_shape=self.image_shape,
                        batch_size=batch, seed=seed, noise=noise, progress=progress)
