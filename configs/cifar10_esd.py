"""ESD on CIFAR-10 (``--mode esd``) from a pretrained checkpoint, the original's values: 10,000 steps at batch 1,
negative guidance 7.5, trajectories with guidance 2 and η 1 on a 50-step DDIM schedule, the pretraining optimizer
(Adam 2e-4, β1 0.9, global-norm clip 1), EMA 0.9999.

  python -m sfd_jax.train --config=configs/cifar10_esd.py --workdir=runs/esd --config.init_checkpoint=ckpt.pth
"""
from sfd_jax.ddpm.baselines.config import esd_config


def get_config():
    return esd_config()
