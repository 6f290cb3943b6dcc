"""The same train steps on 1 device and on 8 (data=2, fsdp=4), and on 2 ``jax.distributed`` processes x 2 devices
against 1 process x 4, for every task (DDPM SFD, Stable Diffusion SFD): one test per property, parametrized over
the task. Each run is a subprocess of tests/scripts/run_steps.py with its own fake device count."""
from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from tests.conftest import ROOT, load_config, subprocess_env

SCRIPT = str(ROOT / "tests" / "scripts" / "run_steps.py")


def _ddpm_source(tmp):
    from tests.ddpm.test_train import make_pretrained
    return make_pretrained(tmp, load_config("tiny_test"))


def _sd_source(tmp):
    from sfd_jax.sd.random_pipeline import write_random_pipeline
    return write_random_pipeline(str(tmp), "tiny", seed=0)


def _ddpm_losses(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def _sd_losses(a, b):
    """Columns g_forget, g_nan_dropped, g_remain, sg_forget, sg_nan_dropped, sg_remain: the SiD loss multiplies
    differences of nearly equal network outputs, which amplifies fp32 rounding of another reduction order."""
    np.testing.assert_allclose(a[:, 3:], b[:, 3:], rtol=2e-5)
    np.testing.assert_allclose(a[:, :3], b[:, :3], rtol=5e-4)


@dataclasses.dataclass(frozen=True)
class Twin:
    source: Callable           # tmp dir -> the script's SOURCE argument
    args: tuple                # extra script arguments
    check_losses: Callable
    moments_per_leaf: bool     # Adam moments relative to each leaf's largest entry (else: to the largest of the kind)
    min_sharded: int           # leaves of >= 4096 entries the 8-device run must hold 1/4 of per device


TWINS = {
    # Adam eps 1e-4: with 1e-8, gradients that are zero up to rounding (per-channel biases under a GroupNorm with
    # one channel per group) become ±lr steps whose sign is rounding noise.
    "ddpm": Twin(_ddpm_source, ("--steps=3", "--adam_eps=1e-4"), _ddpm_losses, False, 100),
    "sd": Twin(_sd_source, ("--steps=2", "--adam_eps=1e-4"), _sd_losses, True, 50),
}


@pytest.fixture(scope="module", params=sorted(TWINS))
def twin(request, tmp_path_factory):
    t = TWINS[request.param]
    return request.param, t, t.source(tmp_path_factory.mktemp(f"src_{request.param}"))


def _start(task, twin, source, out, devices, *args, env_extra=None):
    env = subprocess_env(devices, **(env_extra or {}))
    return subprocess.Popen([sys.executable, SCRIPT, task, str(out), source, *twin.args, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc):
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]


def _compare(twin, a, b):
    """Losses by the task's rule, parameters to 1e-5; Adam moments are gradient statistics (sums reduced in
    another order), compared relative to their largest entry."""
    a, b = np.load(a), np.load(b)
    twin.check_losses(a["losses"], b["losses"])
    assert np.all(np.isfinite(a["losses"]))
    kind = lambda k: ".mu" if ".mu" in k else ".nu" if ".nu" in k else None  # noqa: E731
    scale = {m: max(float(np.abs(a[k]).max()) for k in a.files if k.startswith("param") and kind(k) == m)
             for m in (".mu", ".nu")}
    for k in a.files:
        if not k.startswith("param"):
            continue
        if kind(k):
            ref = max(float(np.abs(a[k]).max()), 1e-12) if twin.moments_per_leaf else scale[kind(k)]
            assert np.abs(a[k] - b[k]).max() <= 1e-3 * ref, k
        else:
            assert np.abs(a[k] - b[k]).max() <= 1e-5, (k, np.abs(a[k] - b[k]).max())
    return a, b


def test_same_steps_on_1_and_8_devices_with_fsdp(tmp_path, twin):
    task, t, source = twin
    _wait(_start(task, t, source, tmp_path / "one.npz", 1))
    _wait(_start(task, t, source, tmp_path / "eight.npz", 8, "--data=2", "--fsdp=4"))
    a, b = _compare(t, tmp_path / "one.npz", tmp_path / "eight.npz")
    assert int(b["n_devices"]) == 8
    sharded = 0
    for k in b.files:
        if k.startswith("shard"):
            full = a["param" + k[5:]].shape
            if np.prod(full) >= 4096:   # the script's fsdp_min_size: every large array holds 1/4 per device
                assert np.prod(b[k]) * 4 == np.prod(full), (k, full, b[k])
                sharded += 1
    assert sharded > t.min_sharded   # parameters of the networks and both Adam moments


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path, twin):
    """2 jax.distributed processes x 2 devices (each host builds its slice of every batch) == 1 process x 4."""
    task, t, source = twin
    _wait(_start(task, t, source, tmp_path / "single.npz", 4, "--data=2", "--fsdp=2"))
    env = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2",
               RUN_STEPS_WORKDIR=str(tmp_path / "wd"))
    procs = [_start(task, t, source, tmp_path / "multi.npz", 2, "--data=2", "--fsdp=2",
                    env_extra={**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    for p in procs:
        _wait(p)
    _compare(t, tmp_path / "single.npz", tmp_path / "multi.npz")
