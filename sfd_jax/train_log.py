"""Training logs: one line per log step, a JSONL record (``metrics.jsonl``) and TensorBoard scalars (``tb/``).
Only process 0 writes."""
from __future__ import annotations

import json
import os
import time

from absl import logging


class MetricsLogger:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency; keep training if it is absent
            logging.warning("tensorboardX is not installed: no TensorBoard events")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))
            self._tb.flush()
        body = ", ".join(f"{k}: {v:.5g}" for k, v in scalars.items() if not k.startswith("lr"))
        print(f"step: {step}, {body}", flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
