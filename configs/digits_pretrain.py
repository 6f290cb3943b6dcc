"""The demo's teacher: a small class-conditional DDPM on scikit-learn's 8x8 digits (1 channel, 1,437 train images).

``python -m sfd_jax.demo`` runs it; on its own:
``python -m sfd_jax.train --config=configs/digits_pretrain.py --workdir=runs/digits_teacher``.

Not one of the original's recipes: cifar10_train.py shrunk until CPU minutes suffice. Deviations, and why:
  * 8x8x1 images, ch 32 (GroupNorm(32) needs multiples of 32), ch_mult (1, 2) (8x8 -> 4x4), one ResNet block per
    level, attention at 4x4 (and in the middle): 0.78M parameters instead of 35.7M.
  * no random flips: digits are not mirror-symmetric.
  * 1,000 steps of batch 128 (~90 epochs) with Adam lr 2e-3 (10x): the samples are already recognisable
    (DDIM 20 steps, guidance 2: ~98% for the demo classifier; without guidance ~90%).
  * EMA 0.995: 0.9999 averages over ~10k steps, ten times the whole run (the EMA would still be mostly the
    random initialisation).
  * the snapshot grids (and the demo's teacher samples) use DDIM 20 steps, eta 0, guidance s=2: as good as 50
    steps here and 2.5x cheaper.
"""
from sfd_jax.ddpm.config import pretrain_config


def get_config():
    c = pretrain_config(dataset="digits", image_size=8, ch_mult=(1, 2))
    c.data.channels = 1
    c.data.random_flip = False
    c.model.in_channels = c.model.out_ch = 1
    c.model.ch = 32
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.ema_rate = 0.995
    c.optim.lr = 0.002
    c.training.batch_size = 128
    c.training.n_iters = 1000
    c.training.snapshot_freq = 500
    c.training.log_freq = 50
    c.training.visualization_samples = 100
    c.sampling.batch_size = 500
    c.sampling.grid_sampler = "ddim"
    c.sampling.grid_steps = 20
    c.sampling.grid_cond_scale = 2.0
    return c
