"""Training under hostile conditions: two writers, dead holders, corrupt checkpoints, changed settings, Ctrl-C,
SIGKILL, a full disk, bad flags. Each test reproduces a failure the trainer used to have."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sfd_jax import train
from sfd_jax.checkpoint import Checkpointer, CheckpointSaveError, CorruptCheckpointError, config_from_json
from sfd_jax.cli_utils import UsageError
from sfd_jax.models.ddpm_unet import ConditionalUNet
from sfd_jax.distill.workdir_lock import WorkdirBusyError, WorkdirLock
from tests.conftest import ROOT, load_config, run_cli
from tests.ddpm.test_train import make_pretrained

N_ITERS, SNAP = 6, 3


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return make_pretrained(tmp_path_factory.mktemp("pre"), load_config("tiny_test"))


def _args(workdir, init, *extra):
    return ["--config=tests/configs/tiny_test.py", f"--workdir={workdir}", f"--config.init_checkpoint={init}",
            f"--config.training.n_iters={N_ITERS}", f"--config.training.snapshot_freq={SNAP}",
            "--config.training.log_freq=1", *extra]


def _train(workdir, init, *extra):
    return run_cli("sfd_jax.train", *_args(workdir, init, *extra))


def _popen(workdir, init, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "sfd_jax.train", *_args(workdir, init, *extra)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc, prefix: str, timeout: float = 600) -> list[str]:
    seen, t0 = [], time.time()
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
        assert time.time() - t0 < timeout, "".join(seen[-20:])
    raise AssertionError(f"process ended before printing {prefix!r}: {proc.wait()} {proc.stderr.read()[-2000:]}")


def _params(workdir, step):
    cfg = load_config("tiny_test")
    shapes = jax.eval_shape(lambda: ConditionalUNet.from_config(cfg).init_params(jax.random.key(0)))
    items = Checkpointer(os.path.join(workdir, "checkpoints")).restore(
        {"generator": shapes, "fake_score": shapes, "generator_ema": shapes}, step)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(items)]


def _assert_same_params(a_dir, b_dir, step=N_ITERS):
    for x, y in zip(_params(a_dir, step), _params(b_dir, step)):
        np.testing.assert_array_equal(x, y)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, pretrained):
    """The uninterrupted 6-step run every interrupted one is compared with (checkpoints 3 and 6)."""
    wd = tmp_path_factory.mktemp("full") / "w"
    proc = _train(wd, pretrained)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd


def _tb_steps(tb_dir, tag="g_total"):
    from tensorboardX.proto.event_pb2 import Event
    steps = []
    for name in sorted(os.listdir(tb_dir)):
        data = open(os.path.join(tb_dir, name), "rb").read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            steps += [ev.step for v in ev.summary.value if v.tag == tag]
    return steps


# ------------------------------------------------------------------------------------------- one writer
def test_lock_refuses_a_live_holder_and_takes_over_from_a_dead_one(tmp_path):
    wd = tmp_path / "w"
    first = WorkdirLock(str(wd)).acquire()
    with pytest.raises(WorkdirBusyError, match=rf"in use by host {socket.gethostname()}, pid {os.getpid()}"):
        WorkdirLock(str(wd)).acquire()
    first.release()
    assert not (wd / ".lock").exists()
    # A lock file whose holder died (no flock held; the pid recorded no longer exists) does not block.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (wd / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    WorkdirLock(str(wd)).acquire().release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        WorkdirLock(str(tmp_path / "file")).acquire()


@pytest.mark.slow
def test_second_trainer_is_refused_and_ctrl_c_saves_and_resumes_exactly(tmp_path, pretrained, full_run):
    """Ctrl-C used to be swallowed by XLA's gc callback (run went on, exit 0) or to stop without saving."""
    wd = tmp_path / "w"
    first = _popen(wd, pretrained, "--config.training.n_iters=1000", "--config.training.snapshot_freq=1000")
    try:
        t0 = time.time()
        while not (wd / ".lock").exists():   # taken before the (slow) set-up and compilation
            assert first.poll() is None and time.time() - t0 < 300, first.stderr.read()[-2000:]
            time.sleep(0.2)
        holder = json.loads((wd / ".lock").read_text())
        assert holder["pid"] == first.pid
        second = _train(wd, pretrained)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = _error_lines(second.stderr)
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and socket.gethostname() in lines[0], lines
        _wait_for_line(first, "step: 1,")
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    saved = Checkpointer(wd / "checkpoints").latest_step()
    logged = [json.loads(ln)["step"] for ln in open(wd / "metrics.jsonl")]
    assert saved is not None and 1 <= saved < N_ITERS and logged[-1] == saved, (saved, logged)
    assert not (wd / ".lock").exists()
    resumed = _train(wd, pretrained)   # n_iters back to 6: a schedule key, allowed and recorded
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_params(full_run, wd)
    assert [json.loads(ln)["step"] for ln in open(wd / "metrics.jsonl")] == list(range(1, N_ITERS + 1))
    change = json.loads(open(wd / "config_changes.jsonl").readline())
    assert change["changes"]["training.n_iters"] == [1000, N_ITERS]


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_resumes_exactly_and_logs_each_step_once(tmp_path, pretrained, full_run):
    """A run killed after its last checkpoint logged steps it redoes: metrics.jsonl read 1..5, 4..6."""
    wd = tmp_path / "w"
    proc = _popen(wd, pretrained, "--config.training.async_checkpoints=False")
    try:
        _wait_for_line(proc, "step: 5,")
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (wd / ".lock").exists()   # left behind by the dead process: must not block the resume
    assert Checkpointer(wd / "checkpoints").latest_step() == SNAP
    resumed = _train(wd, pretrained)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_params(full_run, wd)
    assert [json.loads(ln)["step"] for ln in open(wd / "metrics.jsonl")] == list(range(1, N_ITERS + 1))
    assert sorted(_tb_steps(wd / "tb")) == list(range(1, N_ITERS + 1))


# ------------------------------------------------------------------------------------- corrupt checkpoints
def _without_late_tensorstore_noise(text: str) -> str:
    """Known, unsuppressed noise: after a failed read TensorStore's threads still call into Orbax's closed event
    loop and print 'RuntimeError: Event loop is closed' tracebacks themselves (interleaved, from C++). Everything
    else must be free of tracebacks."""
    noise = ("Traceback (most recent call last):", "asyncio/base_events.py", "_check_closed", "Event loop is closed")
    return "\n".join(ln for ln in text.splitlines() if not any(n in ln for n in noise))


def _corrupt_newest(wd, step=N_ITERS):
    """Truncate the biggest data file of each network item of ``step`` to a third."""
    for item in ("generator", "generator_ema"):
        root = wd / "checkpoints" / str(step) / item
        files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        biggest = max(files, key=os.path.getsize)
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 3)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_for_sample_and_resume(tmp_path, pretrained, full_run):
    wd = tmp_path / "w"
    shutil.copytree(full_run, wd)
    _corrupt_newest(wd)
    out = tmp_path / "s.npz"
    proc = run_cli("sfd_jax.sample", f"--checkpoint={wd}", "--n_per_class=1", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in _without_late_tensorstore_noise(proc.stderr), proc.stderr[-3000:]
    skip = [ln for ln in proc.stderr.splitlines() if "skipping checkpoint step 6" in ln]
    assert len(skip) == 1 and "nothing deleted" in skip[0], proc.stderr[-2000:]
    assert out.exists() and (wd / "checkpoints" / "6").exists()
    resumed = _train(wd, pretrained, "--config.training.n_iters=7")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in _without_late_tensorstore_noise(resumed.stderr), resumed.stderr[-3000:]
    assert (wd / "checkpoints_unreadable" / "6").is_dir()   # moved aside, intact
    assert {"3", "6", "7"} <= set(os.listdir(wd / "checkpoints"))
    _assert_same_params(full_run, wd)   # step 6 redone from step 3 equals the original step 6


def test_no_restorable_checkpoint_is_one_line(tmp_path):
    tree = {"w": np.arange(4096, dtype=np.float32)}
    ck = Checkpointer(tmp_path / "c")
    ck.save(1, {"net": tree})
    ck.wait()
    for d, _, fs in os.walk(tmp_path / "c" / "1" / "net"):
        for f in fs:
            open(os.path.join(d, f), "wb").close()
    with pytest.raises(CorruptCheckpointError, match="no checkpoint in .* restores: step 1: ") as e:
        Checkpointer(tmp_path / "c").restore({"net": jax.eval_shape(lambda: tree)})
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------- changed settings
@pytest.fixture()
def saved_run(tmp_path, pretrained):
    """A workdir as a run leaves it, for checks that stop before any array is read: config.json + a checkpoint."""
    wd = tmp_path / "w"
    cfg = load_config("tiny_test", init_checkpoint=pretrained)
    ck = Checkpointer(wd / "checkpoints")
    ck.save(3, {"generator": {"w": np.zeros(3, np.float32)}}, config=cfg)
    ck.wait()
    (wd / "config.json").write_text(cfg.to_json(indent=2))
    return wd


@pytest.mark.parametrize("override,key", [({"distill.label_to_forget": 3}, "distill.label_to_forget"),
                                          ({"g_optim.lr": 1e-4}, "g_optim.lr"),
                                          ({"training.batch_size": 4}, "training.batch_size")])
def test_resume_refuses_changed_experiment_settings(saved_run, override, key):
    wd = saved_run
    before = open(wd / "config.json").read()
    cfg = config_from_json(json.load(open(wd / "config.json")))
    for k, v in override.items():
        section, leaf = k.split(".")
        cfg[section][leaf] = v
    with pytest.raises(UsageError, match=rf"other settings: {key} .*--allow_config_change={key}"):
        train.make_trainer(cfg, str(wd)).run()
    assert open(wd / "config.json").read() == before and not (wd / ".lock").exists()
    assert not (wd / "config_changes.jsonl").exists()


@pytest.mark.slow
def test_allowed_change_is_recorded(tmp_path, full_run):
    wd = tmp_path / "w"
    shutil.copytree(full_run, wd)
    cfg = config_from_json(json.load(open(wd / "config.json")))
    cfg.g_optim.lr = 1e-4
    cfg.training.n_iters = N_ITERS + 1
    train.make_trainer(cfg, str(wd), allow_changes=("g_optim.lr",)).run()
    rec = json.loads(open(wd / "config_changes.jsonl").readline())
    assert rec["step"] == N_ITERS and set(rec["changes"]) == {"g_optim.lr", "training.n_iters"}
    assert rec["allowed_by_flag"] == ["g_optim.lr"]
    assert json.load(open(wd / "config.json"))["g_optim"]["lr"] == 1e-4
    assert Checkpointer(wd / "checkpoints").latest_step() == N_ITERS + 1


# ---------------------------------------------------------------------------------------------- full disk
def _mount_small_tmpfs(path, size_mb: int) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
def test_full_disk_stops_at_once_in_one_line_and_keeps_the_last_checkpoint(tmp_path, pretrained):
    """A full disk used to print thousands of traceback lines, keep training, and leave a tmp folder behind."""
    mnt = tmp_path / "disk"
    if not _mount_small_tmpfs(mnt, 32):   # one 21 MB checkpoint fits, a second does not
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN) here")
    try:
        wd = mnt / "w"
        proc = _train(wd, pretrained, "--config.training.n_iters=9")
        assert proc.returncode == 1, proc.stderr[-3000:]
        lines = [ln for ln in _error_lines(proc.stderr) if not ln.lstrip("\r").startswith("sfd:")]   # no tqdm
        assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith("sfd_jax.train: error: not enough disk space for checkpoint step 6"), lines
        assert lines[0].endswith("the last complete checkpoint is step 3"), lines
        names = os.listdir(wd / "checkpoints")
        assert "3" in names and not [n for n in names if "tmp" in n], names
        steps = [json.loads(ln)["step"] for ln in open(wd / "metrics.jsonl")]
        assert steps[-1] == 6, steps   # stopped at the failed save, did not train on
        assert len(_params(wd, 3)) > 0
        # A write that fails anyway (space taken meanwhile, quota, ...): one line, the half-written step removed.
        ck = Checkpointer(mnt / "c")
        ck._check_space = lambda step, items: None
        with pytest.raises(CheckpointSaveError, match=r"saving checkpoint step 1 .* failed .*no complete checkpoint"):
            ck.save(1, {"net": {"w": np.random.default_rng(0).random(16 * 2**20 // 4, np.float32)}})
        assert os.listdir(mnt / "c") == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["missing_config", "typo_key", "workdir_is_file", "checkpoints_without_config",
                                  "empty_dataset"])
def test_bad_start_is_one_line(case, tmp_path, pretrained):
    (tmp_path / "file").write_text("x")
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros((0,), np.int64))
    other = tmp_path / "other"
    if case == "checkpoints_without_config":   # another recipe's checkpoints, no config.json
        make_pretrained(other, load_config("tiny_test", **{"mode": "pretrain", "model.ch": 64}))
    base = _args(tmp_path / "w", pretrained)
    args, expect = {
        "missing_config": (["--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"], "no such recipe file"),
        "typo_key": ([*base, "--config.training.n_iterz=3"], 'Did you mean "n_iters"'),
        "workdir_is_file": ([*base, f"--workdir={tmp_path / 'file'}"], "is a file"),
        "checkpoints_without_config": ([*base, f"--workdir={other}"], "different mode"),
        "empty_dataset": (["--config=tests/configs/tiny_test_pretrain.py", f"--workdir={tmp_path / 'w'}",
                           "--config.data.dataset=npz", f"--config.data.path={tmp_path / 'empty.npz'}"], "empty.npz"),
    }[case]
    before = sorted(os.listdir(other)) if other.exists() else None
    proc = run_cli("sfd_jax.train", *args)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "w").exists()
    if before is not None:
        assert sorted(os.listdir(other)) == before


def test_missing_dataset_is_reported_before_any_model_set_up(tmp_path, monkeypatch):
    from sfd_jax.ddpm.trainer import Trainer
    monkeypatch.setattr(Trainer, "build", lambda self: pytest.fail("built the model before opening the data"))
    cfg = load_config("tiny_test_pretrain", **{"data.dataset": "npz", "data.path": str(tmp_path / "none.npz")})
    with pytest.raises(UsageError, match="none.npz"):
        train.make_trainer(cfg, str(tmp_path / "w")).run()
    assert not (tmp_path / "w").exists()
