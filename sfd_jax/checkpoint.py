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
import shutil
import sys
from typing import Any, Callable, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from sfd_jax.cli_utils import UsageError

NETWORKS = ("model", "ema", "fake_score", "generator", "generator_ema")
TMP_MARK = ".orbax-checkpoint-tmp"


class CorruptCheckpointError(UsageError):
    """No checkpoint step of a directory restores (one line: each step tried and why)."""


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, permissions, ...); the run must stop. One line naming the step and the cause."""


class _QuietPartialRestore(logging.Filter):
    """Orbax warns about every item a partial restore leaves alone; partial restores are how we work."""
    _NOISE = ("could not be restored", "Metadata file does not exist")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self._NOISE)


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs every failed read or write with a full traceback (thousands of lines for one full disk). Our
    callers turn those failures into one line (:class:`CheckpointSaveError`, the fallback warning), so Orbax's
    own error records are dropped; ``--verbosity=1`` (or lower) keeps them for debugging."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "orbax" in (record.pathname or ""):
            from absl import logging as absl_logging
            return absl_logging.get_verbosity() >= absl_logging.INFO
        return True


logging.getLogger("absl").addFilter(_QuietPartialRestore())
logging.getLogger("absl").addFilter(_QuietOrbaxErrors())


def _from_orbax(obj) -> bool:
    code = getattr(obj, "cr_code", None) or getattr(obj, "gi_code", None)
    return "orbax" in (getattr(code, "co_filename", "") or "")


_previous_unraisablehook = sys.unraisablehook


def _quiet_orbax_unraisable(unraisable) -> None:
    """A failed read leaves Orbax's sibling coroutines to be collected with their own copy of the error, which
    Python prints as 'Exception ignored in: <coroutine ...>' plus a traceback; the failure itself is reported
    by the caller in one line, so these are dropped (everything else goes to the previous hook)."""
    if _from_orbax(unraisable.object):
        return
    _previous_unraisablehook(unraisable)


sys.unraisablehook = _quiet_orbax_unraisable


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
        self._bad: dict[int, str] = {}
        self._pending: int | None = None   # step of an asynchronous save not yet known to have finished

    # ---------------------------------------------------------------------------------------------- save
    def save(self, step: int, items: Mapping[str, Any], *, config: ml_collections.ConfigDict | None = None,
             meta: Mapping[str, Any] | None = None, force: bool = True) -> None:
        """Save pytrees ``items`` (None values skipped) plus the config and metadata as JSON.

        Raises :class:`CheckpointSaveError` (after removing the half-written step) if this save, or an earlier
        asynchronous one, failed."""
        args = {k: ocp.args.StandardSave(v) for k, v in items.items() if v is not None}
        if config is not None:
            args["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
        args["meta"] = ocp.args.JsonSave(dict(meta or {}))
        self.wait()   # Orbax waits for the previous save anyway; its space is then taken and its errors known
        self._check_space(step, items)
        self._guard(lambda: self.manager.save(step, args=ocp.args.Composite(**args), force=force), f"step {step}")
        self._pending = step

    def check(self) -> None:
        """Raise :class:`CheckpointSaveError` now if a background save has failed (cheap; call once a step)."""
        self._guard(lambda: self.manager.check_for_errors(), self._pending_what())

    def wait(self) -> None:
        self._guard(self.manager.wait_until_finished, self._pending_what())
        self._pending = None

    def _pending_what(self) -> str:
        return f"step {self._pending}" if self._pending is not None else "an earlier asynchronous save"

    def _check_space(self, step: int, items: Mapping[str, Any]) -> None:
        """Refuse a save that cannot fit on a local disk before writing any of it (a full disk mid-save leaves
        Orbax's background threads failing in ways that are slow and noisy to unwind)."""
        if "://" in os.fspath(self.directory):
            return
        need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(dict(items)))
        need = int(need * 1.05) + (1 << 20)   # metadata, JSON items, file-system blocks
        probe = self.directory
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(os.fspath(probe)).free
        if need > free:
            good = self.complete_steps()
            raise CheckpointSaveError(
                f"not enough disk space for checkpoint step {step} in {self.directory}: it needs about "
                f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; "
                + (f"the last complete checkpoint is step {good[-1]}" if good else "no complete checkpoint exists"))

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception:   # a failed save was already reported by wait(); closing must not raise it again
            self.remove_tmp_dirs()

    def _guard(self, fn: Callable[[], Any], what: str):
        try:
            return fn()
        except Exception as e:
            self.remove_tmp_dirs()
            good = self.complete_steps()
            reason = _first_line(e)
            raise CheckpointSaveError(
                f"saving checkpoint {what} in {self.directory} failed ({reason}); "
                + (f"the last complete checkpoint is step {good[-1]}" if good else "no complete checkpoint exists")
            ) from None

    def remove_tmp_dirs(self) -> list[str]:
        """Delete half-written step folders (``*.orbax-checkpoint-tmp*``) left by a failed save."""
        removed = []
        if self.directory.exists():
            for c in self.directory.iterdir():
                if TMP_MARK in c.name:
                    shutil.rmtree(os.fspath(c), ignore_errors=True)
                    removed.append(c.name)
        return removed

    def complete_steps(self) -> list[int]:
        """Steps with a finished checkpoint folder on disk, oldest first."""
        if not self.directory.exists():
            return []
        return sorted(int(c.name) for c in self.directory.iterdir()
                      if c.name.isdigit() and (c / "_CHECKPOINT_METADATA").exists())

    # ------------------------------------------------------------------------------------------- restore
    def latest_step(self) -> int | None:
        """The newest step not found unreadable by an earlier restore through this object."""
        steps = [s for s in self.manager.all_steps() if s not in self._bad]
        return max(steps) if steps else None

    @property
    def skipped(self) -> dict[int, str]:
        """Steps a newest-first restore skipped, with the reason (nothing is deleted)."""
        return dict(self._bad)

    def checked_step(self, step: int | None) -> int:
        """``step``, or the newest step when None; FileNotFoundError when there is no such step."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}")
        return step

    def _newest_first(self, fn: Callable[[int], Any], step: int | None):
        """``fn(step)`` at ``step``, or (``step`` None) at the newest step that restores: a step that fails is
        reported in one warning line, remembered in :attr:`skipped` and the next older one is tried."""
        if step is not None:
            self.checked_step(step)
            try:
                return fn(step)
            except (KeyError, FileNotFoundError):
                raise
            except Exception as e:
                raise CorruptCheckpointError(
                    f"checkpoint {self.directory / str(step)} does not restore ({_first_line(e)})") from None
        tried = []
        while True:
            s = self.latest_step()
            if s is None:
                if tried:
                    raise CorruptCheckpointError(f"no checkpoint in {self.directory} restores: "
                                                 + "; ".join(f"step {t}: {self._bad[t]}" for t in tried))
                raise FileNotFoundError(f"no checkpoint step in {self.directory}")
            try:
                return fn(s)
            except KeyError:
                raise
            except Exception as e:
                self._bad[s] = _first_line(e)
                tried.append(s)
                older = self.latest_step()
                print(f"warning: skipping checkpoint step {s} in {self.directory}: it does not restore "
                      f"({self._bad[s]}); " + (f"trying step {older}" if older is not None else "no older step")
                      + " (nothing deleted)", file=sys.stderr, flush=True)

    def items(self, step: int | None = None) -> list[str]:
        """Names of the items saved at ``step`` (default latest)."""
        d = self.directory / str(self.checked_step(step))
        return sorted(c.name for c in d.iterdir() if c.is_dir())

    def item_shapes(self, name: str, step: int | None = None):
        """Pytree of ShapeDtypeStructs of a saved pytree item, read from metadata (no array is loaded)."""
        def read(s):
            meta = ocp.StandardCheckpointHandler().metadata(self.directory / str(s) / name)
            tree = getattr(meta, "tree", meta)
            return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                                          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        return self._newest_first(read, step)

    def restore_json(self, name: str, step: int | None = None) -> dict:
        def read(s):
            out = self.manager.restore(s, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
            if out[name] is None:
                raise ValueError(f"item {name!r} is empty or unreadable")
            return out[name]
        return self._newest_first(read, step)

    def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
        return config_from_json(self.restore_json("config", step))

    def restore(self, targets: Mapping[str, Any], step: int | None = None) -> dict:
        """Restore the named pytrees. ``targets`` maps item name -> abstract pytree (ShapeDtypeStructs, with
        shardings or without — then replicated over all devices — or arrays), which fixes the device placement:
        any device count or mesh works. ``step`` None: the newest step that restores (see :meth:`restore_step`)."""
        return self.restore_step(targets, step)[1]

    def restore_step(self, targets: Mapping[str, Any], step: int | None = None,
                     json_items: tuple[str, ...] = ()) -> tuple[int, dict]:
        """(step, items): ``targets`` and the JSON items ``json_items``, all from one step (``step``, or the
        newest one that restores, skipping corrupt ones with a warning)."""
        def read(s):
            missing = [k for k in (*targets, *json_items) if k not in self.items(s)]
            if missing:
                raise KeyError(f"checkpoint {self.directory / str(s)} has no item {missing[0]!r}; "
                               f"it holds {', '.join(self.items(s))}")
            args = {k: ocp.args.StandardRestore(_placed(v)) for k, v in targets.items()}
            args.update({k: ocp.args.JsonRestore() for k in json_items})
            out = self.manager.restore(s, args=ocp.args.Composite(**args))
            for k in json_items:
                if out[k] is None:
                    raise ValueError(f"item {k!r} is empty or unreadable")
            return s, {k: out[k] for k in (*targets, *json_items)}
        return self._newest_first(read, step)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


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
