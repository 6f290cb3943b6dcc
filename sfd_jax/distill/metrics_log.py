"""Training logs: one line per log step, a JSONL record (``metrics.jsonl``) and TensorBoard scalars (``tb/``).
Only process 0 writes.

A run resumed from step k first drops every record past k (a run killed after its last checkpoint logged steps
it will redo): ``metrics.jsonl`` and the earlier TensorBoard event files are rewritten without them, and the new
event file starts with TensorBoard's purge marker at k + 1, so both logs read as one uninterrupted run.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import time

from absl import logging


def truncate_jsonl(path: str, last_step: int) -> int:
    """Rewrite ``path`` keeping records with ``step <= last_step`` (and unparsable lines dropped); returns the
    number of records removed."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if step <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def _records(data: bytes):
    pos = 0
    while pos + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 12 + n + 4
        if end > len(data):
            return   # a torn last record (killed mid-write) is dropped
        yield data[pos + 12:pos + 12 + n]
        pos = end


def truncate_tb(tb_dir: str, last_step: int) -> int:
    """Rewrite the event files under ``tb_dir`` without events of ``step > last_step``; returns events dropped."""
    try:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import masked_crc32c
    except ImportError:   # pragma: no cover - tensorboardX is a dependency
        return 0
    total = 0
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        out, dropped = [], 0
        for rec in _records(data):
            ev = Event()
            try:
                ev.ParseFromString(rec)
            except Exception:   # noqa: BLE001 - a corrupt record is dropped like a torn one
                dropped += 1
                continue
            if ev.step > last_step and not ev.HasField("file_version"):
                dropped += 1
                continue
            header = struct.pack("<Q", len(rec))
            out.append(header + struct.pack("<I", masked_crc32c(header)) + rec + struct.pack("<I", masked_crc32c(rec)))
        if dropped:
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(b"".join(out))
            os.replace(tmp, path)
            total += dropped
    return total


class MetricsLogger:
    """``write(step, scalars)``; ``resume_step`` k > 0 drops records past k first (see the module docstring)."""

    def __init__(self, workdir: str, enabled: bool = True, *, resume_step: int = 0):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        jsonl, tb_dir = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tb")
        dropped = truncate_jsonl(jsonl, resume_step) + truncate_tb(tb_dir, resume_step)   # also at step 0
        if dropped:
            print(f"resuming at step {resume_step}: dropped {dropped} log records of later steps "
                  "(logged after the last checkpoint)", flush=True)
        self._jsonl = open(jsonl, "a")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(tb_dir, purge_step=resume_step + 1 if resume_step else None)
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
