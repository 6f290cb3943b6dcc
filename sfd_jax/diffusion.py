"""Stable public name for :mod:`sfd_jax.ddpm.diffusion` (the DDPM schedule, guidance and samplers live there)."""
from sfd_jax.ddpm.diffusion import *  # noqa: F401,F403
