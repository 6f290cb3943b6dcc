"""The one host loop every training mode runs: step, log, checkpoint, grids, stop on a signal.

A trainer supplies a :class:`LoopTask` (its jitted step and inputs, grids, checkpoint items) and a schedule that
decides after each step what to do (:class:`StepSchedule` counts steps, as DDPM training does; the SD trainer's
kimg ticks are another schedule). The loop owns what every mode must do the same way: metric averaging and
images/s, the JSONL/TensorBoard log (cut back to the resumed step), the tqdm bar, saving on SIGTERM/SIGINT,
noticing a failed background save at once, and closing everything on the way out.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from sfd_jax.distill.run_dir import RunDir, StopSignals, close_checkpointer
from sfd_jax.distill.metrics_log import MetricsLogger


@dataclasses.dataclass
class Events:
    """What to do after a step: log the averaged metrics (plus ``scalars``), save a checkpoint, draw grids."""
    log: bool = False
    save: bool = False
    grids: bool = False
    scalars: dict = dataclasses.field(default_factory=dict)


class Schedule(Protocol):
    total: int
    log_on_stop: bool   # also log the partial interval when a signal stops the run

    def after(self, step: int, seconds: float, steps: int) -> Events: ...

    def meta(self, step: int) -> dict: ...


@dataclasses.dataclass
class StepSchedule:
    """Log every ``log_freq`` steps; checkpoint every ``snapshot_freq`` steps, at ``extra`` steps and at the end;
    grids at the snapshots and the end. ``lrs`` are logged with every record."""
    total: int
    log_freq: int
    snapshot_freq: int
    extra: frozenset = frozenset()
    lrs: dict = dataclasses.field(default_factory=dict)
    log_on_stop: bool = True

    def after(self, step: int, seconds: float, steps: int) -> Events:
        end = step >= self.total
        snap = step % self.snapshot_freq == 0 or end
        return Events(log=step % self.log_freq == 0 or end, save=snap or step in self.extra, grids=snap,
                      scalars=dict(self.lrs))

    def meta(self, step: int) -> dict:
        return {}


@dataclasses.dataclass
class LoopTask:
    """A training mode as the loop sees it.

    ``step(state, step_index) -> (state, metrics)`` runs one jitted step (the task fetches its own inputs);
    ``items(state)`` are the checkpoint items; ``grids(state, tag)`` draws sample grids (every process calls it:
    sampling is a collective); ``meta`` is saved with every checkpoint; ``images_per_step`` gives images/s."""
    name: str
    step: Callable[[Any, int], tuple[Any, dict]]
    items: Callable[[Any], dict]
    grids: Callable[[Any, str], None]
    meta: dict
    images_per_step: int
    grid_tag: Callable[[int], str] = str
    postfix_keys: tuple[str, ...] | None = None
    close: Callable[[], None] = lambda: None


def run_loop(run: RunDir, task: LoopTask, schedule: Schedule, state, start: int, stop: StopSignals, *,
             initial_grids: str | None = "0", sigterm_at_step: int | None = None):
    """Train from ``start`` to ``schedule.total``; returns the final state. ``initial_grids`` is the tag of the
    grids drawn before a fresh run's first step (None: none)."""
    ckpt = run.open_checkpointer()
    config = run.config
    logger = MetricsLogger(run.workdir, enabled=run.is_main, resume_step=start)
    if start == 0 and initial_grids is not None and not stop.requested:
        task.grids(state, initial_grids)
    bar = tqdm(total=schedule.total, initial=start, desc=task.name, unit="step", disable=not run.is_main,
               dynamic_ncols=True)
    pending, t_last, steps_since, step, ok = [], time.perf_counter(), 0, start, False
    try:
        while step < schedule.total and not (stop.requested and step == start):
            state, metrics = task.step(state, step)
            step += 1
            steps_since += 1
            pending.append(metrics)
            bar.update(1)
            ckpt.check()
            if sigterm_at_step is not None and step == sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            dt = time.perf_counter() - t_last
            ev = schedule.after(step, dt, steps_since)
            if ev.log or (stop.requested and schedule.log_on_stop):
                avg = {k: float(np.mean([float(m[k]) for m in jax.device_get(pending)])) for k in pending[0]}
                avg["images_per_s"] = steps_since * task.images_per_step / max(dt, 1e-9)
                logger.write(step, {**avg, **ev.scalars})
                keys = task.postfix_keys or [k for k in avg if not k.startswith("lr")]
                bar.set_postfix({k: f"{avg[k]:.4g}" for k in keys if k in avg}, refresh=False)
                pending, t_last, steps_since = [], time.perf_counter(), 0
            if ev.save or stop.requested:
                ckpt.save(step, task.items(state), config=config,
                          meta={**task.meta, "step": step, **schedule.meta(step)})
            if ev.grids:
                task.grids(state, task.grid_tag(step))
            if stop.requested:
                logging.warning("%s: saved step %d, stopping", stop.name, step)
                break
        ok = True
    finally:
        bar.close()
        close_checkpointer(ckpt, raise_errors=ok)
        logger.close()
        task.close()
    return state
