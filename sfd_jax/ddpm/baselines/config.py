"""Recipe bases of the baselines (``configs/*_{retrain,sa,salun,esd}.py``), on top of the pretraining recipe
(README: "The original release and our differences" › Baselines).

Every baseline keeps the pretraining sections (``model``, ``optim`` = Adam 2e-4, β1 0.9, global-norm clip 1.0,
``training``, ``sampling``), as the original ran them with the pretraining optimizer settings. Their own keys live
in ``unlearn``, named after the original's ``train.py`` flags (``--label_to_forget``, ``--alpha``, ``--method``,
``--mask_path``, ``--mask_ratio``, ``--negative_guidance``, ``--cond_scale``, ``--eta``), with the flags' defaults;
Selective Amnesia's γ and λ are ``training.gamma`` / ``training.lmbda``, the keys the original read (and no
config of the original defined). ``unlearn.init_from_ema``: start from the pretrained checkpoint's EMA weights
instead of its raw weights (the original: raw weights, EMA from the file's EMA).
"""
from __future__ import annotations

import ml_collections

from sfd_jax.ddpm.config import pretrain_config, targets_field


def first_stage(variant: str, first: str, second: str) -> bool:
    """Whether a two-stage recipe's variant (``configs/x.py:<variant>``) names its first, artifact-making stage;
    anything but ``first`` / ``second`` is a ValueError naming both."""
    if variant not in (first, second):
        raise ValueError(f"variant must be {first!r} or {second!r}, got {variant!r}")
    return variant == first


def _unlearn(**kw) -> ml_collections.ConfigDict:
    # targets_field: a tuple given on the command line reaches the one-line refusal of baselines.common.forget_label
    return ml_collections.ConfigDict(dict(label_to_forget=targets_field(0), init_from_ema=False, **kw))


def retrain_config(c: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """``--mode retrain``: pretraining from scratch on the remaining classes (label dropout 0.1). ``c``: the
    pretraining recipe to build on (default cifar10_train's values)."""
    c = pretrain_config() if c is None else c
    c.mode = "retrain"
    c.unlearn = ml_collections.ConfigDict(dict(label_to_forget=targets_field(0)))
    return c


def sa_config(fim: bool = False, c: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """Selective Amnesia: ``sa_fim`` (replay + Fisher, ``fim=True``) and ``sa`` (forgetting) share one config.

    Replay: the original's ``sample.py --mode sample_classes`` defaults (5000 per class, 1000-step DDIM at
    η = 1, guidance 2). The Fisher runs over every replay sample and all T timesteps in ``n_chunks`` chunks."""
    c = pretrain_config() if c is None else c
    c.mode = "sa_fim" if fim else "sa"
    c.training.gamma = 1.0
    c.training.lmbda = 10.0
    c.unlearn = _unlearn(
        fisher_path="",                 # sa: the sa_fim workdir (or its fisher.npz; replay.npz beside it)
        n_replay_per_class=5000, replay_sampler="ddim", replay_steps=1000, replay_eta=1.0, replay_cond_scale=2.0,
        fisher_n_samples=0,             # replay samples the Fisher averages over (0 = all of them)
        n_chunks=20,                    # timestep chunks per sample, one per sa_fim step (memory: one chunk's batch)
        fisher_timestep_stride=1)       # 1 = every t in 0..T-1
    return c


def salun_config(mask: bool = False, c: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """SalUn: ``salun_mask`` (``mask=True``) and ``salun``, sharing one config (the original's flag defaults:
    α 1, mask ratio 0.5, guidance 2 in the mask's loss)."""
    c = pretrain_config() if c is None else c
    c.mode = "salun_mask" if mask else "salun"
    c.unlearn = _unlearn(method="rl", alpha=1.0,
                         mask_path="",              # salun: the salun_mask workdir (or its mask.npz); '' = no mask
                         mask_ratio=0.5, mask_cond_scale=2.0,
                         forget_batch_size=0)       # forget images per step (0 = training.batch_size)
    return c


def esd_config(c: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """ESD: 10,000 steps at batch 1 on the forgotten class, negative guidance 7.5, trajectories with the
    original's sampler flags (guidance 2, η 1) on a 50-step DDIM schedule."""
    c = pretrain_config() if c is None else c
    c.mode = "esd"
    c.training.batch_size = 1
    c.training.n_iters = 10000
    c.unlearn = _unlearn(negative_guidance=7.5, cond_scale=2.0, eta=1.0, ddim_steps=50)
    return c
