"""Train states (pytrees), optimizers and the EMA rule.

Parameters and optimizer states are float32 always; the compute dtype is a model attribute.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

Params = Any


@struct.dataclass
class SFDState:
    """Everything an SFD/SiD run updates. The frozen teacher is passed to the step separately."""
    step: jax.Array            # int32 scalar: completed iterations
    generator: Params
    generator_ema: Params
    fake_score: Params
    g_opt: optax.OptState
    sg_opt: optax.OptState

    # Checkpoint item name -> field (see sfd_jax.checkpoint): networks keep the names sample/evaluate read.
    ITEMS = ("generator", "generator_ema", "fake_score", "g_opt", "sg_opt")


@struct.dataclass
class PretrainState:
    """DDPM pretraining: raw parameters, their EMA and the Adam state."""
    step: jax.Array
    params: Params
    ema: Params
    opt: optax.OptState

    ITEMS = ("model", "ema", "opt")


@struct.dataclass
class SDState:
    """Stable Diffusion SFD: as :class:`SFDState`; ``generator_ema`` is None when EMA is off (G_ema is G)."""
    step: jax.Array
    generator: Params
    generator_ema: Params | None
    fake_score: Params
    g_opt: optax.OptState
    sg_opt: optax.OptState

    ITEMS = ("generator", "generator_ema", "fake_score", "g_opt", "sg_opt")


def state_items(state) -> dict:
    """State -> {checkpoint item name: pytree} (the step goes into the checkpoint's metadata)."""
    if isinstance(state, SDState):
        return {k: getattr(state, k) for k in SDState.ITEMS if getattr(state, k) is not None}
    if isinstance(state, SFDState):
        return {k: getattr(state, k) for k in SFDState.ITEMS}
    return {"model": state.params, "ema": state.ema, "opt": state.opt}


def state_from_items(kind: str, step: int, items: dict):
    """Inverse of :func:`state_items`."""
    s = jnp.asarray(step, jnp.int32)
    if kind == "sd_sfd":
        return SDState(step=s, **{k: items.get(k) for k in SDState.ITEMS})
    if kind == "sfd":
        return SFDState(step=s, **{k: items[k] for k in SFDState.ITEMS})
    return PretrainState(step=s, params=items["model"], ema=items["ema"], opt=items["opt"])


def make_optimizer(opt_cfg, clip: str) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, betas=(beta1, beta2), eps, weight_decay=0) after gradient clipping.

    clip='value': clip_grad_value_(grad_clip) (SFD's fake score and generator);
    clip='global_norm': clip_grad_norm_(grad_clip) (DDPM pretraining). optax's Adam has the same eps placement
    as torch (m̂ / (√v̂ + eps)).
    """
    if opt_cfg.optimizer != "Adam":
        raise ValueError(f"optimizer {opt_cfg.optimizer!r} is not supported (only 'Adam', as every shipped config)")
    if opt_cfg.weight_decay or opt_cfg.amsgrad:
        raise ValueError("weight_decay and amsgrad are not supported (0 / false in every shipped config)")
    clipper = optax.clip(opt_cfg.grad_clip) if clip == "value" else optax.clip_by_global_norm(opt_cfg.grad_clip)
    return optax.chain(clipper, optax.adam(opt_cfg.lr, b1=opt_cfg.beta1, b2=opt_cfg.beta2, eps=opt_cfg.eps))


def ema_update(ema: Params, params: Params, rate: float) -> Params:
    """shadow ← shadow + (1 − rate)·(param − shadow), the original's lerp form of rate·shadow + (1−rate)·param."""
    return jax.tree_util.tree_map(lambda e, p: e + (1.0 - rate) * (p - e), ema, params)
