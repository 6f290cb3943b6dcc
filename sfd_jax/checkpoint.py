"""Our checkpoint format: Orbax, one item per network plus the run's config and metadata as JSON.

Layout: ``<workdir>/checkpoints/<step>/{model,ema,fake_score,generator,generator_ema,...,config,meta}``. Each
network is its own item, so ``sample``/``evaluate`` restore just the generator (or EMA) they need, onto any
device count or mesh (the target's shardings decide). Training adds items of its own (optimizer states, rng)
through the same :class:`Checkpointer`. Converted original checkpoints are written in exactly this format.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

NETWORKS = ("model", "ema", "fake_score", "generator", "generator_ema")


class _QuietPartialRestore(logging.Filter):
    """Orbax warns about every item a partial restore leaves alone; partial restores are how we work."""
    _NOISE = ("could not be restored", "Metadata file does not exist")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self._NOISE)


logging.getLogger("absl").addFilter(_QuietPartialRestore())


def _abs(path: str | os.PathLike) -> epath.Path:
    """Orbax needs absolute paths; cloud URLs (gs://...) are kept as they are."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def resolve_checkpoint_dir(path: str | os.PathLike) -> tuple[epath.Path, int | None]:
    """Accept ``WORKDIR``, ``WORKDIR/checkpoints`` or ``WORKDIR/checkpoints/<step>``.

    Returns (the CheckpointManager directory, the step named in the path or None for latest).
    """
    p = _abs(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
    if (p / "checkpoints").is_dir():
        return p / "checkpoints", None
    if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists():
        return p.parent, int(p.name)
    if any(c.name.isdigit() for c in p.iterdir()):
        return p, None
    raise FileNotFoundError(f"{os.fspath(path)!r} holds no sfd_jax checkpoint (expected checkpoints/<step>/)")


class Checkpointer:
    """A thin wrapper of ``orbax.checkpoint.CheckpointManager`` for our item layout."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None,
                 keep_period: int | None = None, async_save: bool = False):
        self.directory = _abs(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ---------------------------------------------------------------------------------------------- save
    def save(self, step: int, items: Mapping[str, Any], *, config: ml_collections.ConfigDict | None = None,
             meta: Mapping[str, Any] | None = None, force: bool = True) -> None:
        """Save pytrees ``items`` (None values skipped) plus the config and metadata as JSON."""
        args = {k: ocp.args.StandardSave(v) for k, v in items.items() if v is not None}
        if config is not None:
            args["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
        args["meta"] = ocp.args.JsonSave(dict(meta or {}))
        self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # ------------------------------------------------------------------------------------------- restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}")
        return step

    def items(self, step: int | None = None) -> list[str]:
        """Names of the items saved at ``step`` (default latest)."""
        d = self.directory / str(self._step(step))
        return sorted(c.name for c in d.iterdir() if c.is_dir())

    def item_shapes(self, name: str, step: int | None = None):
        """Pytree of ShapeDtypeStructs of a saved pytree item, read from metadata (no array is loaded)."""
        meta = ocp.StandardCheckpointHandler().metadata(self.directory / str(self._step(step)) / name)
        tree = getattr(meta, "tree", meta)
        return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                                      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))

    def restore_json(self, name: str, step: int | None = None) -> dict:
        out = self.manager.restore(self._step(step), args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
        return out[name]

    def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
        return config_from_json(self.restore_json("config", step))

    def restore(self, targets: Mapping[str, Any], step: int | None = None) -> dict:
        """Restore the named pytrees. ``targets`` maps item name -> abstract pytree (ShapeDtypeStructs, with
        shardings or without — then replicated over all devices — or arrays), which fixes the device placement:
        any device count or mesh works."""
        step = self._step(step)
        missing = [k for k in targets if k not in self.items(step)]
        if missing:
            raise KeyError(f"checkpoint {self.directory / str(step)} has no item {missing[0]!r}; "
                           f"it holds {', '.join(self.items(step))}")
        args = {k: ocp.args.StandardRestore(_placed(v)) for k, v in targets.items()}
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return {k: out[k] for k in targets}


def _placed(tree):
    """Give target leaves without a sharding a replicated one over all devices, so a checkpoint saved on another
    device count or mesh restores here (Orbax refuses to reuse the saved topology)."""
    def fix(x):
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
            from sfd_jax import parallel
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(parallel.make_mesh()))
        return x
    return jax.tree_util.tree_map(fix, tree)


def _tuplify(obj):
    if isinstance(obj, list):
        return tuple(_tuplify(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _tuplify(v) for k, v in obj.items()}
    return obj


def config_from_json(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Rebuild a ConfigDict from its JSON dump; JSON lists become tuples (our configs' sequence type)."""
    return ml_collections.ConfigDict(_tuplify(dict(d)))


def abstract_like(tree, sharding: jax.sharding.Sharding):
    """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) placed with one ``sharding``."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
