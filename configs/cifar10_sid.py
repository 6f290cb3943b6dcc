"""cifar10_sid.yml: plain SiD distillation (stage 1 of the two-stage recipe); forget coefficients are 0."""
from sfd_jax.ddpm.config import distill_config


def get_config():
    return distill_config(sg_lr=0.00003, sg_forget_coef=0.0, g_forget_coef=0.0, label_to_forget=-1)
