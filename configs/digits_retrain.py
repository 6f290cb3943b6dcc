"""Retrain on 8x8 digits: ``configs/digits_pretrain.py`` (the demo's teacher recipe, the same 1,000 steps of batch
128) on the nine digits other than ``unlearn.label_to_forget``. Deviations from cifar10_retrain.py are the
teacher recipe's (see its docstring)."""
from sfd_jax.ddpm.baselines.config import retrain_config
from sfd_jax.ddpm.config import sibling_config


def get_config():
    return retrain_config(sibling_config(__file__, "digits_pretrain"))
