"""stl10_sfd.yml: one-stage SFD on STL-10 at 64x64 (ch_mult (1,2,2,2,4)), batch 64."""
from sfd_jax.ddpm.config import distill_config


def get_config():
    c = distill_config(sg_lr=0.00003, sg_forget_coef=0.01, g_forget_coef=0.01, label_to_forget=0,
                       dataset="STL10", image_size=64, ch_mult=(1, 2, 2, 2, 4))
    c.training.batch_size = 64
    return c
