"""A tiny SFD-shaped config for tests and smoke runs: 16x16 images, ch 32, one level of attention.

Runs a forward pass in milliseconds on a CPU. Not a recipe.
"""
from sfd_jax.ddpm.config import distill_config


def get_config():
    c = distill_config(sg_lr=0.00003, sg_forget_coef=0.01, g_forget_coef=0.01, label_to_forget=0,
                       dataset="tiny", image_size=16, ch_mult=(1, 2))
    c.model.ch = 32
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (8,)
    c.training.batch_size = 8
    c.training.n_iters = 4
    c.training.snapshot_freq = 2
    c.training.log_freq = 1
    c.training.visualization_samples = 20
    c.sampling.batch_size = 8
    return c
