"""The pretraining twin of tiny_test.py: the same 16x16x3, ch 32 UNet, trained on scikit-learn's digits (resized
to 16x16, grey copied to 3 channels), so the teacher of a tiny SFD smoke run can be made here:

  python -m sfd_jax.train --config=configs/tiny_test_pretrain.py --workdir=runs/tiny_teacher
  python -m sfd_jax.train --config=configs/tiny_test.py --workdir=runs/tiny_sfd --config.init_checkpoint=runs/tiny_teacher

Not a recipe: a few steps of it make a checkpoint of the right shapes, not a good model.
"""
from sfd_jax.config_base import pretrain_config


def get_config():
    c = pretrain_config(dataset="digits", image_size=16, ch_mult=(1, 2))
    c.data.random_flip = False
    c.model.ch = 32
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (8,)
    c.training.batch_size = 8
    c.training.n_iters = 4
    c.training.snapshot_freq = 2
    c.training.log_freq = 1
    c.training.visualization_samples = 20
    c.sampling.batch_size = 8
    c.sampling.grid_sampler = "ddim"
    c.sampling.grid_steps = 2
    return c
