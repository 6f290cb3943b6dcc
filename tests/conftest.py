"""Shared test helpers: config loading, tiny models, running the CLIs in subprocesses."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sfd_jax.perf import apply_cpu_xla_flags

# The CLIs' XLA:CPU settings (sfd_jax.cli_utils.run applies them) for the in-process tests too, before any test
# creates JAX's backends, so in-process and command-line runs compile the same programs; run_cli's processes and
# the test scripts inherit them.
apply_cpu_xla_flags()

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"                # user recipes
TEST_CONFIGS = ROOT / "tests" / "configs"  # tiny configs for tests and smoke runs


def load_config(name: str, **overrides):
    """tests/configs/<name>.py's (else configs/<name>.py's) get_config(), with dotted-key overrides:
    load_config('tiny_test', **{'model.ch': 64})."""
    path = TEST_CONFIGS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", path if path.exists() else CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def subprocess_env(devices: int | None = None, **extra: str) -> dict:
    """The environment of a test's child process: this one's (with its XLA:CPU settings), the repository on
    PYTHONPATH, the CPU platform and, given ``devices``, that many fake CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if devices:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


def run_cli(module: str, *args: str, devices: int | None = None, check: bool = False, cwd=None):
    """Run ``python -m <module> args...`` in a fresh process; returns CompletedProcess (text)."""
    env = subprocess_env(devices)
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def tiny_config():
    return load_config("tiny_test")
