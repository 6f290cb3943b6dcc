"""The demos' shared stage machinery: a background stage is stopped and awaited when the main thread fails."""
from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest

from sfd_jax.demo_stages import BackgroundStage, StageLog, train_stage


def test_background_stage_is_stopped_and_awaited_when_the_block_fails():
    started, ended = threading.Event(), threading.Event()

    def work(stop):
        started.set()
        while not stop.wait(0.01):
            pass
        ended.set()
        raise concurrent.futures.CancelledError("stopped")

    with pytest.raises(RuntimeError, match="main failed"):
        with BackgroundStage(work, "t"):
            assert started.wait(5)
            raise RuntimeError("main failed")
    assert ended.is_set()          # the worker had ended before the error left the block


def test_background_stage_result_reraises_its_own_error():
    def work(stop):
        raise ValueError("bad stage")

    with BackgroundStage(work, "t") as job, pytest.raises(ValueError, match="bad stage"):
        job.result()


def test_classifier_training_stops_at_the_next_step_once_asked():
    from sfd_jax.eval.classifier_train import TrainConfig, train_classifier
    from sfd_jax.models.classifier import ClassifierConfig
    stop = threading.Event()
    stop.set()
    x = np.zeros((16, 8, 8, 1), np.uint8)
    with pytest.raises(concurrent.futures.CancelledError):
        train_classifier(ClassifierConfig(arch="cnn", n_classes=2, image_size=8, channels=1, width=4), x,
                         np.arange(16) % 2, tcfg=TrainConfig(epochs=1, batch_size=8), progress=False, stop=stop)


def test_train_stage_runs_then_reuses_and_reruns_on_a_changed_key(tmp_path):
    log, calls = StageLog(str(tmp_path)), []
    done = lambda: bool(calls)   # noqa: E731 - finished once it ran
    train_stage("s", lambda: calls.append(1), {"a": 1}, str(tmp_path / "s"), log, finished=done)
    train_stage("s", lambda: calls.append(1), {"a": 1}, str(tmp_path / "s"), log, finished=done)
    assert calls == [1] and log.this_run["s"]["reused"]
    train_stage("s", lambda: calls.append(1), {"a": 2}, str(tmp_path / "s"), log, finished=done)
    assert calls == [1, 1] and StageLog(str(tmp_path)).done("s", {"a": 2})
