"""ESD on 8x8 digits from the demo's teacher (``configs/digits_pretrain.py``). Deviations from cifar10_esd.py, for
minutes on 2 CPU cores:
  * 200 steps at batch 8 (cifar10_esd.py: 10,000 at batch 1), one t_enc per step: the same learning rate
    (2e-4), 1,600 trajectories instead of 10,000.
"""
from sfd_jax.ddpm.baselines.config import esd_config
from sfd_jax.ddpm.config import sibling_config


def get_config():
    c = esd_config(sibling_config(__file__, "digits_pretrain"))
    c.training.n_iters, c.training.batch_size = 200, 8
    c.training.snapshot_freq, c.training.log_freq = 100, 25
    c.optim.lr = 0.0002
    return c
