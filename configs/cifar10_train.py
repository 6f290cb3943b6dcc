"""cifar10_train.yml: class-conditional DDPM on CIFAR-10, 800k iterations, batch 128, 10% label dropout."""
from sfd_jax.ddpm.config import pretrain_config


def get_config():
    return pretrain_config()
