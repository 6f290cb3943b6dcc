r"""The teacher of the text-to-image world: latent diffusion on captioned labelled images (``mode='sd_pretrain'``).

  python -m sfd_jax.train --config=configs/sd_world_pretrain.py --workdir=runs/world_teacher \
      --config.sd.model=WORLD_BASE [--config.data.dataset=digits|fashion_mnist|PATH.npz]

``WORLD_BASE`` is a pipeline folder from :func:`sfd_jax.sd.world.build_world_base` (``python -m sfd_jax.demo
--task=sd`` writes one): its UNet (random) is trained, its VAE (trained on the images) and CLIP text encoder
(random, frozen) are not. Values for scikit-learn's 8x8 digits on a CPU: batch 128, 2,000 steps, Adam lr 1e-3
(SD's 1e-4 is for a 860M-parameter UNet; this one has ~2M), caption dropout 0.1 as SD's classifier-free guidance
training, EMA 0.995 (a 0.9999 EMA would still hold the random start after 2,000 steps), grids with DDIM 25 steps
and guidance w = 3.
"""
from sfd_jax.sd.config import sd_pretrain_config


def get_config():
    c = sd_pretrain_config()
    c.data.dataset = "digits"
    t = c.training
    t.batch, t.n_iters, t.log_freq, t.snapshot_freq = 128, 2000, 100, 1000
    t.caption_dropout, t.ema_rate = 0.1, 0.995
    t.grid_per_class, t.grid_steps, t.grid_guidance = 8, 25, 3.0
    c.optim.lr = 1e-3
    return c
