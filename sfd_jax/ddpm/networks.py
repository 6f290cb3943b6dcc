"""Read DDPM networks (teacher, generator, EMA, fake score) from our Orbax checkpoints or an original ``.pth``.

:class:`NetworkReader` is the one reader of both sources: the config that describes the architecture and Flax
param trees for :class:`~sfd_jax.models.ddpm_unet.ConditionalUNet`, shapes checked, placed with the sharding the
caller asks for (or as host arrays). :func:`load_network` (one network, for sampling) and
:func:`load_all_networks` (every network, for initialising a run; :mod:`sfd_jax.ddpm.init` has the rules) use it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from sfd_jax import parallel
from sfd_jax.checkpoint import NETWORKS, Checkpointer, abstract_like, resolve_checkpoint_dir
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


class NetworkReader:
    """The one reader of DDPM networks, for an original ``.pth`` and our Orbax checkpoints alike.

    Opening finds what the checkpoint holds (``kind`` 'pretrained' | 'distilled', ``step``, the network
    ``names``; a ``.pth`` is read whole, it is small); :meth:`read` returns param trees with shapes checked against
    :attr:`config`. An original ``.pth`` carries no config, so ``config`` is required for it; our checkpoints carry
    their own, which a given ``config`` replaces (its shapes must still match). ``what`` names the checkpoint in
    error messages (e.g. 'init_checkpoint').
    """

    def __init__(self, checkpoint: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
                 what: str = "checkpoint"):
        self.path, self.what = os.fspath(checkpoint), what
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{what} {self.path!r} does not exist")
        self._config = config
        if is_seed_checkpoint(self.path):
            if config is None:
                raise UsageError(f"{self.path} is an original .pth, which carries no config: "
                                 "pass --config=configs/<recipe>.py")
            self.kind, self.step, nets = read_seed_ddpm_checkpoint(self.path)
            self._nets = {k: v for k, v in nets.items() if v is not None}
            self.names = tuple(self._nets)
            self.ckpt = None
            return
        directory, self._requested_step = resolve_checkpoint_dir(self.path)
        self.ckpt = Checkpointer(directory)
        # The newest step (or the one named in the path); a read falls back to an older step when the newest
        # does not restore, and then says which step it read.
        self.step = self.ckpt.checked_step(self._requested_step)
        self.names = tuple(n for n in self.ckpt.items(self.step) if n in NETWORKS)
        self.kind = "distilled" if ("generator" in self.names or "generator_ema" in self.names) else "pretrained"

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The given config, else the one stored in our checkpoint."""
        if self._config is None:
            self._config = self.ckpt.restore_config(self._requested_step)
        return self._config

    def missing(self, name: str, hint: str = "") -> UsageError:
        """The one-line error for a network the checkpoint does not hold."""
        if self.ckpt is None:
            return UsageError(f"{self.what} {self.path} holds no {name!r} weights{hint}")
        return UsageError(f"{self.what} {self.ckpt.directory} holds no {name!r} weights (it has "
                          f"{', '.join(self.names) or 'no network'}){hint}")

    def read(self, names=None, *, sharding: jax.sharding.Sharding | None = None) -> dict:
        """{name: params} for ``names`` (default: every network held), placed with ``sharding``; without one,
        host (numpy) arrays (ours restored replicated over every device of every process, the local copy kept)."""
        names = self.names if names is None else tuple(names)
        for name in names:
            if name not in self.names:
                raise self.missing(name)
        expected = abstract_params(self.config)
        if self.ckpt is None:
            out = {}
            for name in names:
                check_params(self._nets[name], expected, what=f"{self.what} {os.path.basename(self.path)} [{name}]")
                out[name] = jax.tree_util.tree_map(np.asarray, self._nets[name])
            return out if sharding is None else jax.device_put(out, sharding)
        for name in names:
            check_params(self.ckpt.item_shapes(name, self._requested_step), expected,
                         what=f"{self.what} item {name!r}")
        target = abstract_like(expected, sharding or parallel.replicated(parallel.make_mesh()))
        self.step, out = self.ckpt.restore_step({n: target for n in names}, self._requested_step)
        if sharding is None:
            out = jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), out)
        return out


def load_network(checkpoint: str | os.PathLike, *, config: ml_collections.ConfigDict | None = None,
                 weights: str = "ema", network: str | None = None,
                 sharding: jax.sharding.Sharding | None = None) -> LoadedNetwork:
    """Load one network. ``network`` names it explicitly; otherwise ``weights`` picks (see :func:`network_for`).
    ``config`` and ``sharding`` as :class:`NetworkReader`."""
    reader = NetworkReader(checkpoint, config)
    name = network or network_for(reader.kind, weights)
    if name not in reader.names:
        raise reader.missing(name, " (pass --weights=raw)" if weights == "ema" else "")
    params = reader.read([name], sharding=sharding)[name]
    return LoadedNetwork(reader.config, params, name, reader.kind, reader.step, reader.path)


def load_all_networks(path: str, config, *, what: str = "init_checkpoint") -> tuple[str, dict]:
    """(kind, {name: host param tree}) for every network a checkpoint holds, shapes checked against ``config``."""
    if not path:
        raise UsageError(f"config.{what} is empty: SFD needs a pretrained (or stage-1) checkpoint")
    reader = NetworkReader(path, config, what=what)
    return reader.kind, reader.read()


def t_init_of(config) -> int:
    """The one-step generator's timestep: ``distill.t_init``, else T−1 (the original's rule)."""
    if "distill" in config and "t_init" in config.distill:
        return int(config.distill.t_init)
    return int(config.diffusion.num_diffusion_timesteps) - 1
