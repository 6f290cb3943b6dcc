"""The demo's teacher: a small class-conditional DDPM on scikit-learn's 8x8 digits (1 channel, 1,437 train images).

``python -m sfd_jax.demo`` runs it; on its own:
``python -m sfd_jax.train --config=configs/digits_pretrain.py --workdir=runs/digits_teacher``.
Not one of the original's recipes: a CIFAR-10-shaped UNet shrunk to ch 32, ch_mult (1, 2) (8x8 -> 4x4), one
ResNet block per level, attention at 4x4 (and the middle), trained a few thousand steps on CPU.
"""
from sfd_jax.config_base import pretrain_config


def get_config():
    c = pretrain_config(dataset="digits", image_size=8, ch_mult=(1, 2))
    c.data.channels = 1
    c.data.random_flip = False        # digits are not mirror-symmetric
    c.model.in_channels = c.model.out_ch = 1
    c.model.ch = 32                   # GroupNorm(32) needs channel counts divisible by 32
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.dropout = 0.1
    c.model.ema_rate = 0.999          # 0.9999 averages over ~10k steps: longer than the whole run
    c.optim.lr = 1e-3
    c.training.batch_size = 128
    c.training.n_iters = 3000
    c.training.snapshot_freq = 1000
    c.training.log_freq = 100
    c.training.visualization_samples = 100
    c.sampling.batch_size = 500
    c.sampling.grid_steps = 50
    return c
