"""SalUn on 8x8 digits from the demo's teacher (``configs/digits_pretrain.py``): ``configs/digits_salun.py:mask``
then ``configs/digits_salun.py``. Deviations from cifar10_salun.py, for minutes on 2 CPU cores:
  * SET LATER
"""
from sfd_jax.ddpm.baselines.config import salun_config
from sfd_jax.ddpm.config import sibling_config


def get_config(variant: str = "salun"):
    if variant not in ("salun", "mask"):
        raise ValueError(f"variant must be 'mask' or 'salun', got {variant!r}")
    c = salun_config(mask=variant == "mask", c=sibling_config(__file__, "digits_pretrain"))
    c.unlearn.forget_batch_size = 32
    c.training.n_iters, c.training.batch_size = 200, 64
    c.training.snapshot_freq, c.training.log_freq = 100, 25
    c.optim.lr = 0.0002
    return c
