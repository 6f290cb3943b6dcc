"""cifar10_sfd_2stage.yml: stage 2 of the two-stage recipe, initialised from a stage-1 SiD checkpoint.

Early-stage snapshots (15 log-spaced intervals below snapshot_freq) as the original.
"""
from sfd_jax.ddpm.config import distill_config


def get_config():
    c = distill_config(sg_lr=0.00003, sg_forget_coef=0.01, g_forget_coef=0.01, label_to_forget=0)
    c.training.early_stage_n_intervals = 15
    return c
