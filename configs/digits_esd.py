"""ESD on 8x8 digits from the demo's teacher (``configs/digits_pretrain.py``). Deviations from cifar10_esd.py, for
minutes on 2 CPU cores:
  * SET LATER
"""
from sfd_jax.ddpm.baselines.config import esd_config
from sfd_jax.ddpm.config import sibling_config


def get_config():
    c = esd_config(sibling_config(__file__, "digits_pretrain"))
    c.training.n_iters, c.training.batch_size = 200, 8
    c.training.snapshot_freq, c.training.log_freq = 100, 25
    c.optim.lr = 0.0005
    return c
