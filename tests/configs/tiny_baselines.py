"""Tiny baseline configs for tests: the tiny_test_pretrain UNet (16x16x3 digits, ch 32) with every baseline
section shrunk so a step compiles and runs in seconds. ``get_config(mode)`` for any baseline mode; batches and
chunks are multiples of 8 so the same steps run on 8 devices. Not a recipe."""
from sfd_jax.ddpm.baselines import config as bc
from sfd_jax.ddpm.config import sibling_config


def get_config(mode: str = "esd"):
    base = sibling_config(__file__, "tiny_test_pretrain")
    make = {"retrain": lambda: bc.retrain_config(base), "sa_fim": lambda: bc.sa_config(True, base),
            "sa": lambda: bc.sa_config(False, base), "salun_mask": lambda: bc.salun_config(True, base),
            "salun": lambda: bc.salun_config(False, base), "esd": lambda: bc.esd_config(base)}
    if mode not in make:
        raise ValueError(f"unknown baseline mode {mode!r}")
    c = make[mode]()
    c.training.batch_size, c.training.n_iters, c.training.snapshot_freq, c.training.log_freq = 8, 4, 2, 1
    u = c.unlearn
    if "n_replay_per_class" in u:
        u.n_replay_per_class, u.replay_steps, u.replay_eta = 1, 2, 0.0
        u.fisher_n_samples, u.fisher_timestep_stride, u.n_chunks = 2, 25, 5   # 5 chunks of 8 timesteps
    if "forget_batch_size" in u:
        u.forget_batch_size = 8
    if "ddim_steps" in u:
        u.ddim_steps = 5
    return c
