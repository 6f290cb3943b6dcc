"""What every trainer does with its workdir, before, during and after the loop.

- Refuse another recipe's workdir, and a workdir that is a file, before writing anything.
- One writer: process 0 holds ``<workdir>/.lock`` (:mod:`sfd_jax.distill.workdir_lock`) for the whole run.
- Resume checks: settings that change the experiment (anything but the schedule keys below) must match the run
  being resumed, unless named in ``allow_changes``; every accepted change is recorded in
  ``config_changes.jsonl``.
- Resume from the newest checkpoint that restores: an unreadable newer step is moved, intact, to
  ``checkpoints_unreadable/<step>`` (so the run can save that step again) with one line saying why.
- SIGTERM and SIGINT (Ctrl-C) both stop the loop after the current step, which is saved; a second Ctrl-C aborts.
- ``config.json`` is written, and the Orbax checkpointer opened, only once the run is known to start.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time

import jax

from sfd_jax.checkpoint import Checkpointer, config_from_json
from sfd_jax.cli_utils import UsageError
from sfd_jax.distill.workdir_lock import WorkdirLock

# Keys that only change the schedule, logging or device layout of a run, not its result: changing them on resume
# is allowed (and recorded). Prefixes end with '.'.
SCHEDULE_KEYS = (
    "training.n_iters", "training.log_freq", "training.snapshot_freq", "training.max_to_keep",
    "training.async_checkpoints", "training.visualization_samples", "training.early_stage_n_intervals",
    "training.duration_kimg", "training.tick_kimg", "training.snap_ticks", "training.dump_ticks",
    "training.grid_steps", "training.grid_prompts", "sampling.", "mesh.", "sd.remat",
)


class StopSignals:
    """While active, SIGTERM and SIGINT set :attr:`signum` instead of killing the process; the loop checks
    :attr:`requested` after each step, saves and stops. A second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: saving after this step and stopping "
                  "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


class RunDir:
    """Mixin for a trainer with ``self.config``, ``self.workdir``; subclasses set ``SAME_RECIPE_KEYS``."""
    SAME_RECIPE_KEYS: tuple[str, ...] = ("mode",)

    def _init_run_dir(self, config, workdir: str, *, allow_changes: tuple[str, ...] = ()) -> None:
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.is_main = jax.process_index() == 0
        self.allow_changes = tuple(allow_changes)
        self.stop_signal = ""      # "SIGTERM" / "SIGINT" when a signal stopped the run
        self.config_changes: dict[str, list] = {}
        self._lock = WorkdirLock(self.workdir)
        self.ckpt_dir = os.path.join(self.workdir, "checkpoints")
        self.check_workdir()
        self.ckpt = None  # created once the run is known to start: a failed start writes nothing

    # ------------------------------------------------------------------------------------- before start
    def check_workdir(self) -> None:
        """A workdir that is a file, or of another recipe (any of ``SAME_RECIPE_KEYS`` differs), is refused."""
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise UsageError(f"--workdir {self.workdir} is a file, not a directory")
        saved = self.saved_config()
        if saved is None:
            return
        for key in self.SAME_RECIPE_KEYS:
            a, b = _plain(get_dotted(saved, key)), _plain(get_dotted(self.config, key))
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                raise UsageError(f"workdir {self.workdir} holds a run with a different {key} ({a} vs {b}); "
                                 "use a new --workdir")

    def saved_config(self):
        """The config of the run in this workdir: ``config.json``, else the newest checkpoint's; None if new."""
        path = os.path.join(self.workdir, "config.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    return config_from_json(json.load(f))
            except (OSError, ValueError) as e:
                raise UsageError(f"{path} is not a readable config ({type(e).__name__}: {e})") from None
        if not self._has_checkpoint_dirs():
            return None
        try:
            return Checkpointer(self.ckpt_dir).restore_config()
        except Exception as e:   # noqa: BLE001 - any failure to read it is the same answer for the user
            raise UsageError(f"workdir {self.workdir} holds checkpoints but no config.json, and its checkpoints "
                             f"hold no readable config ({type(e).__name__}); use a new --workdir") from None

    def check_resume_config(self) -> None:
        """Refuse, in one line, a resume whose experiment settings differ from the saved run's (unless allowed)."""
        if not self._has_checkpoint_dirs():
            return
        saved = self.saved_config()
        if saved is None:
            return
        old, new = _flatten(_plain(saved)), _flatten(_plain(self.config))
        changed = {k: [old[k], new[k]] for k in sorted(set(old) & set(new)) if old[k] != new[k]}
        changed.update({k: [None, new[k]] for k in sorted(set(new) - set(old))})   # settings newer code added
        refused = [k for k in changed
                   if k in old and not _is_schedule_key(k) and not any(_matches(k, a) for a in self.allow_changes)]
        if refused:
            shown = ", ".join(f"{k} ({json.dumps(changed[k][0])} -> {json.dumps(changed[k][1])})"
                              for k in refused[:4]) + (f" and {len(refused) - 4} more" if len(refused) > 4 else "")
            raise UsageError(f"workdir {self.workdir} holds a run with other settings: {shown}; use a new --workdir, "
                             f"or resume anyway with --allow_config_change={','.join(refused)} (recorded in "
                             "config_changes.jsonl)")
        self.config_changes = changed

    @contextlib.contextmanager
    def guarded(self):
        """The run's outer frame: the workdir lock (process 0) and :class:`StopSignals`; on exit the lock is
        released (and a workdir this run created removed again if the run never started)."""
        self._started = False
        if self.is_main:
            self._lock.acquire()
        try:
            with StopSignals() as stop:
                yield stop
                self.stop_signal = stop.name
        finally:
            self._lock.release(remove_empty_workdir=not self._started)

    # ------------------------------------------------------------------------------------------- start
    def write_config(self, step: int = 0) -> None:
        self._started = True
        if self.is_main:
            os.makedirs(self.workdir, exist_ok=True)
            tmp = os.path.join(self.workdir, "config.json.tmp")
            with open(tmp, "w") as f:
                f.write(self.config.to_json(indent=2))
            os.replace(tmp, os.path.join(self.workdir, "config.json"))
            if self.config_changes:
                record = {"step": int(step), "time": time.time(), "changes": self.config_changes,
                          "allowed_by_flag": list(self.allow_changes)}
                with open(os.path.join(self.workdir, "config_changes.jsonl"), "a") as f:
                    f.write(json.dumps(record, default=str) + "\n")
                print(f"resuming at step {step} with changed settings: {', '.join(self.config_changes)} "
                      "(recorded in config_changes.jsonl)", flush=True)

    def open_checkpointer(self) -> Checkpointer:
        if self.ckpt is None:
            t = self.config.training
            self.ckpt = Checkpointer(self.ckpt_dir, max_to_keep=int(t.max_to_keep) or None,
                                     async_save=bool(t.async_checkpoints))
        return self.ckpt

    def _has_checkpoint_dirs(self) -> bool:
        return os.path.isdir(self.ckpt_dir) and any(n.isdigit() for n in os.listdir(self.ckpt_dir))

    def latest_step(self) -> int | None:
        if not self._has_checkpoint_dirs():
            return None
        return self.open_checkpointer().latest_step()

    def restore_newest(self, targets, json_items: tuple[str, ...] = ()) -> tuple[int, dict]:
        """(step, items) from the newest checkpoint that restores; unreadable newer steps are moved aside."""
        ckpt = self.open_checkpointer()
        step, items = ckpt.restore_step(targets, None, json_items=json_items)
        if ckpt.skipped:
            if self.is_main:
                aside = os.path.join(self.workdir, "checkpoints_unreadable")
                os.makedirs(aside, exist_ok=True)
                for s, why in ckpt.skipped.items():
                    dest = os.path.join(aside, str(s))
                    if os.path.exists(dest):
                        dest += f".{int(time.time())}"
                    shutil.move(os.path.join(self.ckpt_dir, str(s)), dest)
                    print(f"resuming from step {step}: moved unreadable step {s} to {dest} ({why})",
                          file=sys.stderr, flush=True)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("sfd_jax.unreadable_steps_moved")
            ckpt.close()
            self.ckpt = None
            self.open_checkpointer()
        return step, items


def close_checkpointer(ckpt: Checkpointer | None, *, raise_errors: bool) -> None:
    """Wait for the last save and close. ``raise_errors`` False (the loop already failed): a save error here is
    not raised over the first one, only its half-written folder cleaned up."""
    if ckpt is None:
        return
    try:
        ckpt.wait()
    except Exception:
        if raise_errors:
            ckpt.close()
            raise
    ckpt.close()


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of ``tree`` carrying the matching leaf of ``shardings`` (restore targets)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def get_dotted(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return node


def _plain(v):
    if hasattr(v, "to_dict"):
        v = v.to_dict()
    return json.loads(json.dumps(v, default=str))


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, pattern: str) -> bool:
    return key == pattern or (pattern.endswith(".") and key.startswith(pattern)) or key.startswith(pattern + ".")


def _is_schedule_key(key: str) -> bool:
    return any(_matches(key, p) for p in SCHEDULE_KEYS)
