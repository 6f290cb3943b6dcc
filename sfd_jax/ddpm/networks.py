"""Find and load one DDPM network (teacher, generator, EMA) from our Orbax checkpoints or an original ``.pth``.

Both sources give the same thing: the config that describes the architecture and a Flax param tree for
:class:`~sfd_jax.models.ddpm_unet.ConditionalUNet`, placed with the sharding the caller asks for.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from sfd_jax.checkpoint import Checkpointer, abstract_like, resolve_checkpoint_dir
from sfd_jax.cli_utils import UsageError
from sfd_jax.convert.ddpm import check_params, read_seed_ddpm_checkpoint
from sfd_jax.models.ddpm_unet import ConditionalUNet

WEIGHTS = ("ema", "raw")


@dataclasses.dataclass
class LoadedNetwork:
    config: ml_collections.ConfigDict
    params: Any
    name: str            # 'model' | 'ema' | 'generator' | 'generator_ema' | 'fake_score'
    kind: str            # 'pretrained' | 'distilled'
    step: int | None
    source: str


def is_seed_checkpoint(path: str | os.PathLike) -> bool:
    """True for an original ``.pth`` file (a file, not a directory)."""
    return os.path.isfile(os.fspath(path))


def network_for(kind: str, weights: str) -> str:
    """Which network sampling uses: the generator for distilled checkpoints, the model for pretrained ones."""
    if weights not in WEIGHTS:
        raise UsageError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    base = "generator" if kind == "distilled" else "model"
    if weights == "raw":
        return base
    return "generator_ema" if kind == "distilled" else "ema"


def abstract_params(config, sharding: jax.sharding.Sharding | None = None):
    """ShapeDtypeStructs of the configured model's parameters (no allocation)."""
    model = ConditionalUNet.from_config(config)
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0)))
    return shapes if sharding is None else abstract_like(shapes, sharding)


def load_network(checkpoint: str | os.PathLike, *, config: ml_collections.ConfigDict | None = None,
                 weights: str = "ema", network: str | None = None,
                 sharding: jax.sharding.Sharding | None = None) -> LoadedNetwork:
    """Load one network. ``network`` names it explicitly; otherwise ``weights`` picks (see :func:`network_for`).

    An original ``.pth`` carries no config, so ``config`` is required for it. Our checkpoints carry their own;
    a given ``config`` replaces it (its shapes must still match).
    """
    path = os.fspath(checkpoint)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if is_seed_checkpoint(path):
        if config is None:
            raise UsageError(f"{path} is an original .pth, which carries no config: pass --config=configs/<recipe>.py")
        kind, step, nets = read_seed_ddpm_checkpoint(path)
        name = network or network_for(kind, weights)
        params = nets.get(name)
        if params is None:
            raise UsageError(f"{path} holds no {name!r} weights" + (" (pass --weights=raw)" if weights == "ema" else ""))
        check_params(params, abstract_params(config), what=os.path.basename(path))
        params = jax.tree_util.tree_map(np.asarray, params)
        if sharding is not None:
            params = jax.device_put(params, sharding)
        return LoadedNetwork(config, params, name, kind, step, path)

    directory, step = resolve_checkpoint_dir(path)
    ckpt = Checkpointer(directory)
    items = ckpt.items(step)
    kind = "distilled" if ("generator" in items or "generator_ema" in items) else "pretrained"
    name = network or network_for(kind, weights)
    if name not in items:
        raise UsageError(f"checkpoint {directory} holds no {name!r} weights (it has {', '.join(i for i in items if i not in ('config', 'meta'))})"
                         + (" (pass --weights=raw)" if weights == "ema" else ""))
    stored = ckpt.restore_config(step)
    config = stored if config is None else config
    target = abstract_params(config, sharding)
    check_params(ckpt.item_shapes(name, step), target, what=f"checkpoint item {name!r}")
    params = ckpt.restore({name: target}, step)[name]
    return LoadedNetwork(config, params, name, kind, step if step is not None else ckpt.latest_step(), path)


def t_init_of(config) -> int:
    """The one-step generator's timestep: ``distill.t_init``, else T−1 (the original's rule)."""
    if "distill" in config and "t_init" in config.distill:
        return int(config.distill.t_init)
    return int(config.diffusion.num_diffusion_timesteps) - 1
