"""Stage machinery shared by the demos (digits SFD, the leaderboard, the SD world): a record of finished stages
(``WORKDIR/demo_state.json``), the run-or-resume-or-reuse rule for training stages, stage banners, and a
background stage that stops cleanly when the main thread fails."""
from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from typing import Callable


class StageLog:
    """``WORKDIR/demo_state.json``: per finished stage, its key settings and how long it took when it ran."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "demo_state.json")
        self.data = json.load(open(self.path)) if os.path.exists(self.path) else {}
        self.this_run: dict[str, dict] = {}
        self._lock = threading.Lock()   # a background stage records from its own thread

    def done(self, stage: str, key) -> bool:
        entry = self.data.get(stage)
        return entry is not None and entry.get("key") == plain(key)

    def record(self, stage: str, key, seconds: float, reused: bool = False) -> None:
        with self._lock:
            if not reused:
                self.data[stage] = {"key": plain(key), "seconds": round(seconds, 2)}
                tmp = self.path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(self.data, f, indent=2, sort_keys=True)
                os.replace(tmp, self.path)
            self.this_run[stage] = {"seconds": round(seconds, 2), "reused": reused,
                                    "seconds_when_run": self.data.get(stage, {}).get("seconds")}


def plain(v):
    """``v`` (a ConfigDict, dataclass dict, ...) as plain JSON values, for comparing stage keys."""
    if hasattr(v, "to_dict"):
        v = v.to_dict()
    return json.loads(json.dumps(v, default=str, sort_keys=True))


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def latest_step(workdir: str) -> int | None:
    """The newest checkpoint step under ``workdir/checkpoints`` (None: no checkpoint yet)."""
    from sfd_jax.checkpoint import Checkpointer
    ckpts = os.path.join(workdir, "checkpoints")
    return Checkpointer(ckpts).latest_step() if os.path.isdir(ckpts) else None


def train_stage(name: str, run: Callable[[], None], config, workdir: str, log: StageLog, *,
                total: int | None = None, finished: Callable[[], bool] | None = None) -> None:
    """Run, resume or reuse the training stage ``name``: reused when ``log`` holds it with the same ``config`` and it
    is finished (``finished()``, or else its newest checkpoint reaches step ``total``); otherwise ``run()`` starts
    it or resumes it from its newest checkpoint, and its wall time is recorded."""
    latest = latest_step(workdir)
    done = finished() if finished is not None else latest is not None and total is not None and latest >= total
    if done and log.done(name, config):
        print(f"{name}: reusing {workdir}" + (f" (step {latest})" if latest is not None else ""), flush=True)
        log.record(name, config, 0.0, reused=True)
        return
    if latest is not None:
        print(f"{name}: resuming {workdir} from step {latest}", flush=True)
    t0 = time.perf_counter()
    run()
    log.record(name, config, time.perf_counter() - t0)


class BackgroundStage:
    """``fn(stop)`` in a worker thread while the main thread runs other stages (JAX releases the GIL while it
    computes). ``stop`` is a :class:`threading.Event` the stage checks between its steps (it then raises
    ``concurrent.futures.CancelledError``).

    Used as a context manager: leaving the block with an exception sets ``stop`` and waits for the worker to end
    before the exception propagates, so a failed start exits with its one-line error instead of tearing the
    runtime down under a running computation. :meth:`result` waits and re-raises the stage's own error."""

    def __init__(self, fn: Callable[[threading.Event], object], name: str):
        self.stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._future = self._pool.submit(fn, self.stop)

    def result(self):
        return self._future.result()

    def __enter__(self) -> "BackgroundStage":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.stop.set()
        self._pool.shutdown(wait=True)
