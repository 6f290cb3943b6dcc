"""cifar10_sfd.yml: one-stage SFD on CIFAR-10 (forget class 0 -> override 1); fake-score lr 1e-5."""
from sfd_jax.ddpm.config import distill_config


def get_config():
    return distill_config(sg_lr=0.00001, sg_forget_coef=0.01, g_forget_coef=0.01, label_to_forget=0)
