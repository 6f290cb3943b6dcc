"""The pretraining twin of tiny_test.py: the same 16x16x3, ch 32 UNet (its model section, loaded from there),
trained on scikit-learn's digits (resized to 16x16, grey copied to 3 channels), so the teacher of a tiny SFD smoke
run can be made here:

  python -m sfd_jax.train --config=tests/configs/tiny_test_pretrain.py --workdir=runs/tiny_teacher
  python -m sfd_jax.train --config=tests/configs/tiny_test.py --workdir=runs/tiny_sfd --config.init_checkpoint=runs/tiny_teacher

Not a recipe: a few steps of it make a checkpoint of the right shapes, not a good model.
"""
from sfd_jax.ddpm.config import pretrain_config, sibling_config


def get_config():
    sfd = sibling_config(__file__, "tiny_test")
    c = pretrain_config(dataset="digits", image_size=sfd.data.image_size, ch_mult=sfd.model.ch_mult)
    c.model = sfd.model
    c.data.random_flip = False
    for key in ("batch_size", "n_iters", "snapshot_freq", "log_freq", "visualization_samples"):
        c.training[key] = sfd.training[key]
    c.sampling.batch_size = sfd.sampling.batch_size
    c.sampling.grid_sampler = "ddim"
    c.sampling.grid_steps = 2
    return c
