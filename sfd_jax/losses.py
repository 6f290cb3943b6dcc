"""Stable public name for :mod:`sfd_jax.distill.losses` (the SiD / SFD formulas live there)."""
from sfd_jax.distill.losses import *  # noqa: F401,F403
