"""Retrain on 8x8 digits: ``configs/digits_pretrain.py`` (the demo's teacher recipe) on the nine digits other than
``unlearn.label_to_forget``. Deviations from cifar10_retrain.py are the teacher recipe's (see its docstring), and:
  * 400 steps of batch 128 (the teacher: 1,000), ~40 epochs of the nine digits: retraining is the costliest
    baseline by far, and the leaderboard samples its raw weights (the 0.995 EMA of a 400-step run still holds
    0.995**400 = 13% of the random initialisation).
"""
from sfd_jax.ddpm.baselines.config import retrain_config
from sfd_jax.ddpm.config import sibling_config


def get_config():
    c = retrain_config(sibling_config(__file__, "digits_pretrain"))
    c.training.n_iters, c.training.snapshot_freq = 400, 200
    return c
