"""SalUn on 8x8 digits from the demo's teacher (``configs/digits_pretrain.py``): ``configs/digits_salun.py:mask``
then ``configs/digits_salun.py``. Deviations from cifar10_salun.py, for minutes on 2 CPU cores:
  * 200 steps of 64 remaining-digit images + 32 forgotten-digit images (cifar10_salun.py: 1,000 steps of 128 +
    128): the train split holds only ~143 images of one digit, so a step sees a quarter of them.
"""
from sfd_jax.ddpm.baselines.config import first_stage, salun_config
from sfd_jax.ddpm.config import sibling_config


def get_config(variant: str = "salun"):
    c = salun_config(mask=first_stage(variant, "mask", "salun"), c=sibling_config(__file__, "digits_pretrain"))
    c.unlearn.forget_batch_size = 32
    c.training.n_iters, c.training.batch_size = 200, 64
    c.training.snapshot_freq, c.training.log_freq = 100, 25
    c.optim.lr = 0.0002
    return c
