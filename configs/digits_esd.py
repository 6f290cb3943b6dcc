"""ESD on 8x8 digits from the demo's teacher (``configs/digits_pretrain.py``). Deviations from cifar10_esd.py, for
minutes on 2 CPU cores:
  * start from the teacher's EMA weights (the raw weights of a 1,000-step run at lr 2e-3 are noisier).
  * SET LATER
"""
from sfd_jax.ddpm.baselines.config import esd_config
from sfd_jax.ddpm.config import sibling_config


def get_config():
    c = esd_config(sibling_config(__file__, "digits_pretrain"))
    c.unlearn.init_from_ema = True
    c.training.n_iters, c.training.batch_size = 200, 8
    c.training.snapshot_freq, c.training.log_freq = 100, 25
    c.optim.lr = 0.0002
    return c
