"""Shared pieces of the DDPM recipe configs (``configs/*.py``), under the original's key names
(README: "The original release and our differences" › DDPM configs).

Every key the original read with a silent default is explicit here. Sequences are tuples so that command-line
overrides such as ``--config.model.ch_mult=(1,2,2,2)`` work. Keys that are ours, not the original's: ``mode``,
``init_checkpoint``, ``seed``, ``dtype``, ``mesh.*``, ``distill.label_to_forget`` (the original's CLI flag)
and ``distill.teacher_from``.

``distill.label_to_forget`` / ``distill.label_to_override`` (and the baselines' ``unlearn.label_to_forget``) are
:func:`targets_field` fields: they take one class or a tuple of classes, from Python and from the command line
(``--config.distill.label_to_forget=3``, ``=2,5,7`` or ``='(2,5,7)'``), and hold one target as an int.
"""
from __future__ import annotations

import numbers

import ml_collections


def canonical_targets(value):
    """One class as an int, several as a tuple of ints: ``3``, ``(3,)``, ``[3]`` and ``np.int64(3)`` -> ``3``;
    ``[2, 5, 7]`` -> ``(2, 5, 7)``; ``()`` -> ``-1`` (nothing). Anything else (a string, a float, a bool, None) is
    returned unchanged for the task's validation to name."""
    def as_int(v):
        return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v
    if isinstance(value, (list, tuple)):
        items = tuple(as_int(v) for v in value)
        if not items:
            return -1
        return items[0] if len(items) == 1 else items
    return as_int(value)


class TargetsReference(ml_collections.FieldReference):
    """An ``object``-typed field (so ml_collections' command-line parser reads ``3`` and ``(2,5,7)`` as Python
    literals) that stores :func:`canonical_targets` of what it is set to: ``3`` and ``(3,)`` are the same run, and
    a single target is written to ``config.json`` as the int it always was (old workdirs resume unchanged)."""

    def __init__(self, default):
        super().__init__(canonical_targets(default), field_type=object)

    def set(self, value, type_safe=True):
        super().set(canonical_targets(value), type_safe)


def targets_field(value) -> TargetsReference:
    """A config field holding one class (int) or several (tuple); see :class:`TargetsReference`."""
    return TargetsReference(value)


def _adam(lr: float, beta1: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        optimizer="Adam", lr=lr, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
        grad_clip=1.0))


def ddpm_base(dataset: str = "CIFAR10", image_size: int = 32, ch_mult=(1, 2, 2, 2)) -> ml_collections.ConfigDict:
    """The values common to all five original DDPM configs (cifar10_train.yml without optim/training)."""
    c = ml_collections.ConfigDict()
    c.mode = "pretrain"          # 'pretrain' | 'sfd'
    c.init_checkpoint = ""       # original .pth or our Orbax checkpoint directory ('' = none)
    c.seed = 1234
    c.dtype = "float32"          # compute dtype: 'float32' | 'bfloat16' (parameters stay float32)
    c.comments = "nil"

    # -1: all remaining devices; arrays smaller than fsdp_min_size elements are replicated, not sharded.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 14))

    c.data = ml_collections.ConfigDict(dict(
        dataset=dataset, path="./data", image_size=image_size, channels=3, logit_transform=False,
        uniform_dequantization=False, gaussian_dequantization=False, random_flip=True, rescaled=True,
        num_workers=4, n_classes=10))

    c.model = ml_collections.ConfigDict(dict(
        type="simple", in_channels=3, out_ch=3, ch=128, ch_mult=tuple(ch_mult), num_res_blocks=2,
        attn_resolutions=(16,), dropout=0.1, var_type="fixedlarge", ema_rate=0.9999, ema=True,
        resamp_with_conv=True, cond_drop_prob=0.1,
        remat=False,   # ours: recompute block activations in the backward pass
        conv_impl="auto"))  # ours: 'auto' | 'lax' | 'dot1x1' | 'im2col' | 'shift' (sfd_jax.models.conv; auto: per backend)

    c.diffusion = ml_collections.ConfigDict(dict(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_diffusion_timesteps=1000))

    c.training = ml_collections.ConfigDict(dict(
        batch_size=128, n_iters=800000, snapshot_freq=5000, log_freq=50, visualization_samples=100,
        early_stage_n_intervals=0,    # 0 = no early-stage snapshots (key absent in the original)
        max_to_keep=0,                # ours: checkpoints kept (0 = all)
        async_checkpoints=True))      # ours: Orbax writes in the background

    c.sampling = ml_collections.ConfigDict(dict(
        batch_size=128, last_only=True,
        # ours: how pretraining snapshots draw their grid (the original: 1000-step ancestral, guidance 2)
        grid_sampler="ddim", grid_steps=50, grid_cond_scale=2.0))
    return c


def pretrain_config(**kw) -> ml_collections.ConfigDict:
    """cifar10_train.yml: class-conditional DDPM pretraining (Adam 2e-4, beta1 0.9, global-norm clip 1.0)."""
    c = ddpm_base(**kw)
    c.optim = _adam(lr=0.0002, beta1=0.9)
    return c


def distill_config(*, sg_lr: float, sg_forget_coef: float, g_forget_coef: float, label_to_forget,
                   **kw) -> ml_collections.ConfigDict:
    """The SiD/SFD configs: shared values of cifar10_sid/sfd/sfd_2stage/stl10_sfd.yml. ``label_to_forget``: a
    class, a tuple of classes, or -1 (plain SiD)."""
    c = ddpm_base(**kw)
    c.mode = "sfd"
    c.model.type = "sid"
    c.model.cond_drop_prob = 0.0
    c.training.n_iters = 50000
    c.sg_optim = _adam(lr=sg_lr, beta1=0.0)
    c.g_optim = _adam(lr=0.00001, beta1=0.0)
    c.distill = ml_collections.ConfigDict(dict(
        alpha=1.2, t_min=38, t_init=440, t_max=712,
        sg_remain_coef=1.0, sg_forget_coef=sg_forget_coef, g_remain_coef=1.0, g_forget_coef=g_forget_coef,
        # the original's --label_to_forget CLI flag (-1 = plain SiD), or a tuple of classes forgotten at once
        label_to_forget=targets_field(label_to_forget),
        # one override for every forgotten class, a tuple (one per forgotten class), or None: pseudo_label_type
        label_to_override=targets_field(1), pseudo_label_type="rand", use_clf=False, clf_path="",
        init_from_ema=True,
        teacher_from="fake_score",           # the original's rule; 'pretrained' = what --init_ckpt_0 meant
        pretrained_checkpoint="",            # teacher/fake-score source when teacher_from='pretrained'
        fused=True,                          # ours: remain+forget passes as one batch (same math)
        # Read by the original with silent defaults (absent from every shipped config):
        cond_scale=0.0, cond_drop_prob=0.0, forget_warmup=0.0, use_diffinst=False))
    return c


def sibling_config(config_file: str, name: str, *args) -> ml_collections.ConfigDict:
    """``get_config(*args)`` of ``configs/<name>.py`` next to ``config_file`` (recipes build on each other by
    path, so they work whatever the current directory or ``sys.path``)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"sfd_config_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(*args)
