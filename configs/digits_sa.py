"""Selective Amnesia on 8x8 digits from the demo's teacher (``configs/digits_pretrain.py``):
``configs/digits_sa.py:fim`` then ``configs/digits_sa.py``. Deviations from cifar10_sa.py, for minutes on 2 CPU
cores:
  * replay: 100 samples per remaining digit with the teacher's snapshot sampler (DDIM 20 steps, η 0, guidance 2):
    1000-step DDIM would cost 50x more for samples the classifier already recognises ~98%.
  * Fisher over the first 180 of them (20 per digit) and every 20th timestep (the sum over t scaled by 20), in
    one chunk of 50 per step: the full sum over 1000 timesteps of 900 samples is 100x the work.
  * λ = 0.01 (cifar10_sa.py: 10): F sums the noise loss over 1000 timesteps before squaring, so its entries reach
    1e2–1e7 (mean ~700 here); with λ = 10 the penalty's gradient outweighs the forget loss's by orders of magnitude
    and the model cannot move.
  * 200 steps of batch 64 surrogates + 64 replay samples (cifar10_sa.py: 10,000 of 128).
"""
from sfd_jax.ddpm.baselines.config import first_stage, sa_config
from sfd_jax.ddpm.config import sibling_config


def get_config(variant: str = "sa"):
    c = sa_config(fim=first_stage(variant, "fim", "sa"), c=sibling_config(__file__, "digits_pretrain"))
    u = c.unlearn
    u.n_replay_per_class, u.replay_steps, u.replay_eta, u.replay_cond_scale = 100, 20, 0.0, 2.0
    u.fisher_n_samples, u.fisher_timestep_stride, u.n_chunks = 180, 20, 1
    c.training.gamma, c.training.lmbda = 1.0, 0.01
    c.training.n_iters, c.training.batch_size = 200, 64
    c.training.snapshot_freq, c.training.log_freq = 100, 25
    c.optim.lr = 0.0002
    return c
