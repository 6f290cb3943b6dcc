"""Independent PyTorch reference of the SFD DDPM pieces, for JAX/Flax parity tests.

Written independently from a description of the original release (README: "The original release and our
differences" › DDPM network, DDPM distillation), not from the original code.  It needs only torch and numpy.

Contents
- ``RefConditionalModel`` (defined in :mod:`sfd_jax.ddpm.torch_unet`, re-exported here): the class-conditional UNet
  (NCHW), with the original ``state_dict`` names, so that its weights can be fed to the checkpoint converter and its
  outputs compared with the Flax model.
- ``ref_get_beta_schedule`` / ``ref_alphas_cumprod``: the noise schedules.
- ``ref_seq``, ``ref_one_step``, ``ref_ddim``, ``ref_ddpm``: the samplers of sections 1.5 and 1.7.
- ``count_params`` and the model kwargs ``CIFAR10_KW`` / ``STL10_KW`` of the shipped configs.

Deliberate difference from the original: each ResnetBlock's class-embedding width is 4*ch (the
original hard-codes 512, so only ch=128 runs).  For ch=128 the two agree exactly.

Shape notation: B batch, C channels, H = W = spatial side, D = 4*ch embedding width.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CIFAR10_KW",
    "STL10_KW",
    "RefConditionalModel",
    "count_params",
    "ref_alphas_cumprod",
    "ref_compute_alpha",
    "ref_ddim",
    "ref_ddpm",
    "ref_get_beta_schedule",
    "ref_one_step",
    "ref_seq",
    "ref_timestep_embedding",
]

# Model kwargs of the shipped configs.  cond_drop_prob is left at its default 0.0
# (the sid/sfd configs); cifar10_train.yml uses 0.1.
CIFAR10_KW = dict(
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=0.1,
    in_channels=3,
    resolution=32,
    n_classes=10,
    resamp_with_conv=True,
)
STL10_KW = dict(CIFAR10_KW, ch_mult=(1, 2, 2, 2, 4), resolution=64)


# The UNet (and its blocks) lives in the package, where ``python -m sfd_jax.bench --compare=torch`` uses it too.
from sfd_jax.ddpm.torch_unet import (  # noqa: E402,F401
    AttnBlock,
    Downsample,
    EmbedMLP,
    RefConditionalModel,
    ResnetBlock,
    Upsample,
    count_params,
    normalize,
    ref_timestep_embedding,
    swish,
)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def ref_get_beta_schedule(kind: str, beta_start: float, beta_end: float, T: int) -> np.ndarray:
    """float64 numpy betas [T]."""
    if kind == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif kind == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif kind == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif kind == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif kind == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64)))
        betas = s * (beta_end - beta_start) + beta_start
    else:
        raise NotImplementedError(kind)
    assert betas.shape == (T,)
    return betas


def ref_alphas_cumprod(betas) -> torch.Tensor:
    """abar [T] = cumprod(1 - beta), with beta cast to float32 first and the product in float32."""
    b = torch.as_tensor(np.asarray(betas) if not torch.is_tensor(betas) else betas).float()
    return (1.0 - b).cumprod(dim=0)


def ref_compute_alpha(betas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """abar_t for t in {-1, ..., T-1} as [B, 1, 1, 1]; abar_{-1} = 1 (a zero beta is prepended)."""
    b = torch.cat([torch.zeros(1, dtype=betas.dtype, device=betas.device), betas], dim=0)
    a = (1.0 - b).cumprod(dim=0).index_select(0, t.long() + 1)
    return a.view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Samplers (sections 1.5 and 1.7)
# ---------------------------------------------------------------------------------------------

# A sampler's model is any callable model(x, t, c, mode, cond_drop_prob=..., cond_scale=...).
ModelFn = Callable[..., torch.Tensor]


def ref_seq(skip_type: str, timesteps: int, T: int) -> list[int]:
    """The timestep sequence (ascending) for the generalized sampler."""
    if skip_type == "uniform":
        skip = T // timesteps
        return list(range(0, T, skip))
    if skip_type == "quad":
        return [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), timesteps) ** 2)]
    raise NotImplementedError(skip_type)


def ref_one_step(model: ModelFn, z: torch.Tensor, c: torch.Tensor, t_init: int,
                 alphas_cumprod: torch.Tensor, cond_scale: float) -> torch.Tensor:
    """One-step generator: x_t = init_b*z; x0 = x_t/init_a - init_sigma*eps.  z: [B, C, H, W]."""
    abar = alphas_cumprod[t_init]
    init_a = abar.sqrt()
    init_b = (1.0 - abar).sqrt()
    init_sigma = (1.0 / abar - 1.0).sqrt()
    x_t = init_b * z
    t = torch.full((z.shape[0],), float(t_init), device=z.device)
    eps = model(x_t, t, c, "test", cond_drop_prob=0.0, cond_scale=cond_scale)
    return x_t / init_a - init_sigma * eps


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def ref_ddim(model: ModelFn, x: torch.Tensor, c: torch.Tensor, seq: Sequence[int],
             betas: torch.Tensor, eta: float, cond_scale: float,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Generalized (DDIM-with-eta) steps; x: [B, C, H, W] starting noise -> final sample.

    One N(0, I) draw (shape of x) per step, in order from the largest timestep down.
    """
    n = x.shape[0]
    seq_next = [-1] + list(seq[:-1])
    for i, j in zip(reversed(list(seq)), reversed(seq_next)):
        t = torch.ones(n, device=x.device) * i
        t_next = torch.ones(n, device=x.device) * j
        at = ref_compute_alpha(betas, t)
        at_next = ref_compute_alpha(betas, t_next)
        eps = model(x, t, c, "test", cond_scale=cond_scale)
        x0 = (x - eps * (1 - at).sqrt()) / at.sqrt()  # no clipping
        c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1 ** 2).sqrt()
        x = at_next.sqrt() * x0 + c1 * _randn_like(x, generator) + c2 * eps
    return x


@torch.no_grad()
def ref_ddpm(model: ModelFn, x: torch.Tensor, c: torch.Tensor, seq: Sequence[int],
             betas: torch.Tensor, cond_scale: float,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Intended ancestral ('ddpm_noisy') steps; x: [B, C, H, W] starting noise -> final sample.

    One N(0, I) draw per step (also at t == 0, where it is masked out), so the random stream
    matches a loop that always draws.
    """
    n = x.shape[0]
    seq_next = [-1] + list(seq[:-1])
    for i, j in zip(reversed(list(seq)), reversed(seq_next)):
        t = torch.ones(n, device=x.device) * i
        t_next = torch.ones(n, device=x.device) * j
        at = ref_compute_alpha(betas, t)
        atm1 = ref_compute_alpha(betas, t_next)
        beta_t = 1 - at / atm1
        eps = model(x, t, c, "test", cond_scale=cond_scale)
        x0 = ((1.0 / at).sqrt() * x - (1.0 / at - 1).sqrt() * eps).clamp(-1, 1)
        mean = ((atm1.sqrt() * beta_t) * x0 + ((1 - beta_t).sqrt() * (1 - atm1)) * x) / (1.0 - at)
        noise = _randn_like(x, generator)
        mask = (1.0 - (t == 0).to(x.dtype)).view(-1, 1, 1, 1)
        x = mean + mask * torch.exp(0.5 * beta_t.log()) * noise
    return x
