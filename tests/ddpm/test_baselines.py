"""The baseline modes end to end: 1 vs 8 devices, kill and resume, bad input, the CIFAR-10 recipes, sampling and
evaluating their checkpoints. Loss formulas: tests/ddpm/test_baselines_losses.py."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sfd_jax.checkpoint import Checkpointer
from sfd_jax.ddpm.baselines.common import remain_classes, save_tree
from sfd_jax.ddpm.baselines.salun import saliency_mask
from sfd_jax.ddpm.config import sibling_config
from sfd_jax.models.ddpm_unet import ConditionalUNet
from tests.conftest import ROOT, TEST_CONFIGS, last_line, run_cli, subprocess_env
from tests.ddpm.test_train import make_pretrained

SCRIPT = str(ROOT / "tests" / "scripts" / "run_baseline_steps.py")
TINY = "--config=tests/configs/tiny_baselines.py"


def tiny_config(mode: str):
    return sibling_config(str(TEST_CONFIGS / "tiny_test.py"), "tiny_baselines", mode)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_pretrained(tmp_path_factory.mktemp("teacher"), tiny_config("sa"))


def write_artifacts(directory, cfg, seed=0):
    """fisher.npz (random positive), replay.npz (random digits of the remaining classes), mask.npz (top half)."""
    p = ConditionalUNet.from_config(cfg).init_params(jax.random.key(seed))
    r = np.random.default_rng(seed)
    g = jax.tree_util.tree_map(lambda x: r.normal(size=x.shape).astype(np.float32), p)
    save_tree(os.path.join(directory, "fisher.npz"), jax.tree_util.tree_map(np.square, g))
    save_tree(os.path.join(directory, "mask.npz"), saliency_mask(g, 0.5), dtype=np.uint8)
    labels = np.repeat(np.array(remain_classes(cfg)), 2)
    np.savez(os.path.join(directory, "replay.npz"), labels=labels,
             images=r.integers(0, 256, (len(labels), 16, 16, 3), dtype=np.uint8))
    return str(directory)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return write_artifacts(tmp_path_factory.mktemp("artifacts"), tiny_config("sa"))


def _run_steps(out, teacher, artifacts, devices, *args):
    env = subprocess_env(devices)
    proc = subprocess.run([sys.executable, SCRIPT, str(out), teacher, artifacts, *args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.slow
def test_every_baseline_step_is_the_same_on_1_and_8_devices(tmp_path, teacher, artifacts):
    """retrain, sa_fim (6 one-chunk steps: a whole sample and the next one's first chunk), sa, salun_mask, salun,
    esd: metrics to rtol 1e-5, parameters to 1e-5, accumulated gradients and Adam moments to 1e-4 of the largest
    element of their kind, Fisher sums of squared gradients to 3e-4 (sums over the batch reduced in another order;
    some gradients are zero up to rounding)."""
    _run_steps(tmp_path / "one", teacher, artifacts, 1, "--steps=6")
    _run_steps(tmp_path / "eight", teacher, artifacts, 8, "--steps=6", "--data=2", "--fsdp=4")
    def kind(key):   # statistics of gradients, compared relative to the largest element of their kind
        return next((s for s in (".mu", ".nu", ".acc", ".partial") if s in key), None)
    for mode in ("retrain", "sa_fim", "sa", "salun_mask", "salun", "esd"):
        a, b = np.load(tmp_path / f"one_{mode}.npz"), np.load(tmp_path / f"eight_{mode}.npz")
        assert int(b["n_devices"]) == 8
        np.testing.assert_allclose(a["metrics"], b["metrics"], rtol=1e-5, atol=1e-6, err_msg=mode)
        leaves = [k for k in a.files if k.startswith("leaf")]
        scale = {kind(k): 0.0 for k in leaves}
        for k in leaves:
            scale[kind(k)] = max(scale[kind(k)], float(np.abs(a[k]).max()))
        for k in leaves:
            # Fisher partial sums are sums of squared gradients: a reordering's relative error doubles (seen at
            # 1.4e-4 with XLA's YNNPACK fusions off); a missing or doubled shard would be O(1)
            rel = 3e-4 if kind(k) == ".partial" else 1e-4
            tol = rel * scale[kind(k)] if kind(k) else 1e-5
            assert np.abs(a[k] - b[k]).max() <= tol, (mode, k, np.abs(a[k] - b[k]).max())


def _train(workdir, mode, teacher, artifacts, *extra):
    args = [TINY.replace(".py", f".py:{mode}"), f"--workdir={workdir}"]
    if mode != "retrain":
        args.append(f"--config.init_checkpoint={teacher}")
    if mode == "sa":
        args.append(f"--config.unlearn.fisher_path={artifacts}")
    if mode == "salun":
        args.append(f"--config.unlearn.mask_path={artifacts}")
    return run_cli("sfd_jax.train", *args, *extra)


def _leaves(workdir, step):
    cfg = tiny_config("salun")
    shapes = jax.eval_shape(lambda: ConditionalUNet.from_config(cfg).init_params(jax.random.key(0)))
    got = Checkpointer(os.path.join(workdir, "checkpoints")).restore({"model": shapes, "ema": shapes}, step)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(got)]


@pytest.mark.slow
def test_salun_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, teacher, artifacts):
    """Two data streams (remain and forget) and the mask: SIGTERM after step 2, resume, bitwise equal at step 4."""
    full = _train(tmp_path / "full", "salun", teacher, artifacts)
    assert full.returncode == 0, full.stderr[-2000:]
    first = _train(tmp_path / "resumed", "salun", teacher, artifacts, "--sigterm_at_step=2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2"]
    second = _train(tmp_path / "resumed", "salun", teacher, artifacts)
    assert second.returncode == 0, second.stderr[-2000:]
    for x, y in zip(_leaves(tmp_path / "full", 4), _leaves(tmp_path / "resumed", 4)):
        np.testing.assert_array_equal(x, y)
    assert [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("case", ["missing_fisher", "missing_replay", "missing_mask", "mask_of_another_tree",
                                  "fisher_of_another_shape", "unknown_method", "forget_out_of_range"])
def test_bad_baseline_input_is_one_line_and_leaves_the_workdir_alone(case, tmp_path, teacher, artifacts):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("precious")
    other = tmp_path / "other"
    other.mkdir()
    mode = "sa" if "fisher" in case or "replay" in case else "salun"
    extra, expect = {
        "missing_fisher": ([f"--config.unlearn.fisher_path={tmp_path / 'none'}"], "does not exist"),
        "missing_replay": ([f"--config.unlearn.fisher_path={other / 'fisher.npz'}"], "no replay.npz"),
        "missing_mask": ([f"--config.unlearn.mask_path={tmp_path / 'none.npz'}"], "does not exist"),
        "mask_of_another_tree": ([f"--config.unlearn.mask_path={other}"], "does not fit the model"),
        "fisher_of_another_shape": ([f"--config.unlearn.fisher_path={other}"], "does not fit the model"),
        "unknown_method": (["--config.unlearn.method=l1"], "unlearn.method must be one of rl, ga"),
        "forget_out_of_range": (["--config.unlearn.label_to_forget=10"], "label_to_forget=10 is outside"),
    }[case]
    if case == "missing_replay":
        save_tree(str(other / "fisher.npz"), {"w": np.zeros(3, np.float32)})
    elif case in ("mask_of_another_tree", "fisher_of_another_shape"):
        write_artifacts(other, _wider(mode))
    before = sorted(os.listdir(workdir))
    proc = _train(workdir, mode, teacher, artifacts, *extra)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]
    assert sorted(os.listdir(workdir)) == before


def _wider(mode):
    c = tiny_config(mode)
    c.model.ch = 64
    return c


def test_unknown_leaderboard_method_is_one_line():
    proc = run_cli("sfd_jax.demo", "--methods=sfd,forget_me", "--workdir=/nonexistent/never_written")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc.stderr) == ("sfd_jax.demo: error: --methods: unknown method 'forget_me'; choose from "
                                      "sfd, retrain, sa, salun, esd"), proc.stderr
    assert not os.path.exists("/nonexistent/never_written")


SMALL = ["--config.model.ch=32", "--config.model.ch_mult=(1,2)", "--config.model.num_res_blocks=1",
         "--config.model.attn_resolutions=(8,)", "--config.data.image_size=16", "--config.training.n_iters=2",
         "--config.training.snapshot_freq=2", "--config.training.log_freq=1",
         "--config.training.visualization_samples=10", "--config.sampling.batch_size=10",
         "--config.sampling.grid_steps=2"]


@pytest.mark.slow
def test_cifar10_baseline_recipes_run_two_steps_with_a_reduced_model(tmp_path):
    """Every recipe loads and runs two steps (the artifact modes: their pass, shrunk) on a reduced model, writes
    checkpoints, JSONL, events, grids; `sample` and `evaluate forgetting` read the baseline checkpoints (DDIM with
    guidance)."""
    from sfd_jax.eval.classifier_train import save_classifier
    from sfd_jax.models.classifier import ClassifierConfig, init_variables
    cfg = sibling_config(str(ROOT / "configs" / "cifar10_sa.py"), "cifar10_sa")
    for k, v in (("ch", 32), ("ch_mult", (1, 2)), ("num_res_blocks", 1), ("attn_resolutions", (8,))):
        cfg.model[k] = v
    cfg.data.image_size = 16
    teacher = make_pretrained(tmp_path / "teacher", cfg)
    r = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=r.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
             labels=np.arange(40) % 10)
    data = ["--config.data.dataset=npz", f"--config.data.path={tmp_path / 'data.npz'}"]
    runs = [("retrain", "cifar10_retrain.py", ["--config.training.batch_size=4", *data]),
            ("sa_fim", "cifar10_sa.py:fim", ["--config.unlearn.n_replay_per_class=1", "--config.unlearn.replay_steps=2",
                                             "--config.unlearn.fisher_n_samples=2",
                                             "--config.unlearn.fisher_timestep_stride=100",
                                             "--config.unlearn.n_chunks=1"]),
            ("sa", "cifar10_sa.py", ["--config.training.batch_size=4",
                                     f"--config.unlearn.fisher_path={tmp_path / 'sa_fim'}"]),
            ("salun_mask", "cifar10_salun.py:mask", ["--config.training.batch_size=4", *data]),
            ("salun", "cifar10_salun.py", ["--config.training.batch_size=4", *data,
                                           f"--config.unlearn.mask_path={tmp_path / 'salun_mask'}"]),
            ("esd", "cifar10_esd.py", ["--config.unlearn.ddim_steps=4"])]
    for name, recipe, extra in runs:
        init = [] if name == "retrain" else [f"--config.init_checkpoint={teacher}"]
        proc = run_cli("sfd_jax.train", f"--config=configs/{recipe}", f"--workdir={tmp_path / name}", *SMALL,
                       *init, *extra)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        d = tmp_path / name
        assert json.load(open(d / "config.json"))["mode"] == name
        records = [json.loads(line) for line in open(d / "metrics.jsonl")]
        assert records and all(np.isfinite(v) for v in records[-1].values()), name
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(d / "tb"))
        if name in ("sa_fim", "salun_mask"):
            assert (d / ("fisher.npz" if name == "sa_fim" else "mask.npz")).exists()
        else:
            assert {"model", "ema", "opt"} <= set(os.listdir(d / "checkpoints" / "2"))
            assert {"sample-2.png", "sample-ema-2.png"} <= set(os.listdir(d / "samples"))
    clf_cfg = ClassifierConfig(arch="cnn", n_classes=10, image_size=16, channels=3, width=8)
    save_classifier(str(tmp_path / "clf"), init_variables(clf_cfg, jax.random.key(0)), clf_cfg, {}, step=0)
    for name in ("retrain", "sa", "salun", "esd"):
        s = run_cli("sfd_jax.sample", f"--checkpoint={tmp_path / name}", "--sampler=ddim", "--steps=2",
                    "--cond_scale=2", "--n_per_class=1", f"--out={tmp_path / (name + '.npz')}")
        assert s.returncode == 0, (name, s.stderr[-2000:])
        assert np.load(tmp_path / (name + ".npz"))["images"].shape == (10, 16, 16, 3)
        e = run_cli("sfd_jax.evaluate", "forgetting", f"--checkpoint={tmp_path / name}",
                    f"--classifier={tmp_path / 'clf'}",
                    "--sampler=ddim", "--steps=2", "--cond_scale=2", "--n_per_class=2", "--forget=0",
                    f"--out={tmp_path / (name + '_ua.json')}")
        assert e.returncode == 0, (name, e.stderr[-2000:])
        assert "per_class" in json.load(open(tmp_path / (name + "_ua.json")))
