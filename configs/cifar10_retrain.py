"""Retrain on CIFAR-10 (``--mode retrain``): cifar10_train.yml's values (800k steps, batch 128, Adam 2e-4, label
dropout 0.1) on the nine classes other than ``unlearn.label_to_forget`` (default 0)."""
from sfd_jax.ddpm.baselines.config import retrain_config


def get_config():
    return retrain_config()
