"""Selective Amnesia on CIFAR-10: ``configs/cifar10_sa.py:fim`` (mode ``sa_fim``: replay set + Fisher) then
``configs/cifar10_sa.py`` (mode ``sa``: forgetting), both from a pretrained checkpoint:

  python -m sfd_jax.train --config=configs/cifar10_sa.py:fim --workdir=runs/sa_fim --config.init_checkpoint=ckpt.pth
  python -m sfd_jax.train --config=configs/cifar10_sa.py --workdir=runs/sa --config.init_checkpoint=ckpt.pth \
      --config.unlearn.fisher_path=runs/sa_fim

The original's values where it has them: the pretraining optimizer (Adam 2e-4, β1 0.9, global-norm clip 1), batch
128, EMA 0.9999, replay by its ``sample.py --mode sample_classes`` defaults (5000 per class, 1000-step DDIM at
η 1, guidance 2), the Fisher over every replay sample and all 1000 timesteps. The original defines no γ, λ or
step count for this mode: γ = 1, λ = 10 and 10,000 steps are our choice (not tuned at CIFAR-10 scale).
"""
from sfd_jax.ddpm.baselines.config import first_stage, sa_config


def get_config(variant: str = "sa"):
    c = sa_config(fim=first_stage(variant, "fim", "sa"))
    c.training.n_iters = 10000
    return c
