"""Training: step semantics, resume, recipes, bad input (1 vs 8 devices and multi-process: tests/method/test_task_twins.py)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.ddpm import diffusion
from sfd_jax.checkpoint import Checkpointer
from sfd_jax.models.ddpm_unet import ConditionalUNet
from sfd_jax.ddpm.task import DDPMTask
from sfd_jax.distill.state import SFDState, make_optimizer
from sfd_jax.ddpm.steps import antithetic_timesteps, make_sfd_step
from sfd_jax.ddpm.trainer import early_stage_steps
from tests.conftest import load_config, run_cli

def make_pretrained(directory, cfg, seed=0):
    p = ConditionalUNet.from_config(cfg).init_params(jax.random.key(seed))
    ckpt = Checkpointer(os.path.join(directory, "checkpoints"))
    ckpt.save(100, {"model": p, "ema": p}, config=cfg)
    ckpt.wait()
    return str(directory)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return make_pretrained(tmp_path_factory.mktemp("pre"), load_config("tiny_test"))


def test_early_stage_steps_are_the_originals():
    assert sorted(early_stage_steps(5000, 15)) == [1, 3, 6, 11, 20, 38, 70, 129, 238, 438, 805, 1480, 2721]
    assert early_stage_steps(5000, 0) == set()


def test_antithetic_timesteps():
    t = np.asarray(antithetic_timesteps(jax.random.key(0), 7, 1000))
    assert t.shape == (7,) and ((0 <= t) & (t < 1000)).all()
    np.testing.assert_array_equal(t[4:7], 999 - t[0:3])


def test_task_labels_and_timesteps():
    task = DDPMTask.from_config(load_config("cifar10_sfd"))
    c = np.asarray(task.remain_labels(jax.random.key(0), 5000))
    assert set(np.unique(c)) == set(range(1, 10))
    o = np.asarray(task.override_labels(jax.random.key(1), 10))
    assert (o == 1).all()
    rand = DDPMTask(**{**task.__dict__, "label_to_override": None})
    o = np.asarray(rand.override_labels(jax.random.key(2), 9000))
    assert set(np.unique(o)) == set(range(1, 10)) and abs(np.mean(o == 9) - 1 / 9) < 0.02
    t = np.asarray(task.timesteps(jax.random.key(3), 20000))
    assert t.min() == 38 and t.max() == 711
    warm = DDPMTask(**{**task.__dict__, "forget_warmup_steps": 10})
    tw = np.asarray(warm.forget_timesteps(jax.random.key(4), 20000, 3))
    assert tw.min() == 20 and tw.max() == 979
    assert np.asarray(warm.forget_timesteps(jax.random.key(4), 100, 10)).max() < 712


def _micro():
    """A very small model (8x8, one level, no attention): compiles in seconds."""
    cfg = load_config("tiny_test", **{"model.ch_mult": (1,), "model.attn_resolutions": (), "data.image_size": 8})
    cfg.model.dropout = 0.0                   # dropout masks are the only draws that differ between the modes
    cfg.g_optim.eps = cfg.sg_optim.eps = 1e-4
    model = ConditionalUNet.from_config(cfg)
    p = model.init_params(jax.random.key(0))
    g_tx, sg_tx = make_optimizer(cfg.g_optim, "value"), make_optimizer(cfg.sg_optim, "value")
    st = SFDState(step=jnp.int32(0), generator=p, generator_ema=p, fake_score=p, g_opt=g_tx.init(p),
                  sg_opt=sg_tx.init(p))
    return cfg, model, p, st, (g_tx, sg_tx)


def _one_step(cfg, model, p, st, txs, **kw):
    _, ac = diffusion.schedule_from_config(cfg)
    step = jax.jit(make_sfd_step(model, cfg, DDPMTask.from_config(cfg), ac, *txs, batch_size=4, **kw))
    _, m = step(st, p, jax.random.key(1))
    return {k: float(v) for k, v in m.items()}


def test_classifier_override_uses_the_classifiers_choice():
    """'amax' with a classifier that prefers class 2 (and the forgotten class 0, which is masked) equals a fixed
    label_to_override=2."""
    cfg, model, p, st, txs = _micro()
    cfg.distill.label_to_override = 2
    fixed = _one_step(cfg, model, p, st, txs)
    cfg.distill.label_to_override = None
    cfg.distill.pseudo_label_type = "amax"
    logits = jnp.array([9.0, 0.0, 5.0] + [1.0] * 7)
    clf = _one_step(cfg, model, p, st, txs, classifier_fn=lambda x: jnp.broadcast_to(logits, (x.shape[0], 10)))
    for k in fixed:
        assert clf[k] == pytest.approx(fixed[k], rel=1e-6), k


def test_fused_and_separate_passes_give_the_same_losses():
    cfg, model, p, st, txs = _micro()
    out = {fused: _one_step(cfg, model, p, st, txs, fused=fused) for fused in (True, False)}
    # The SiD loss multiplies differences of nearly equal network outputs, which amplifies fp32 rounding of the
    # different batch shapes; the fake-score losses are plain sums of squares.
    for k in out[True]:
        assert out[True][k] == pytest.approx(out[False][k], rel=1e-5 if k.startswith("sg") else 1e-4), k
    assert out[True]["sg_forget_loss"] > 0 and out[True]["g_forget_loss"] != 0


def _train(workdir, init, *extra, devices=None):
    return run_cli("sfd_jax.train", "--config=tests/configs/tiny_test.py", f"--workdir={workdir}",
                   f"--config.init_checkpoint={init}", "--config.training.n_iters=6",
                   "--config.training.snapshot_freq=3", "--config.training.log_freq=1", *extra, devices=devices)


def _restore(workdir, step):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    cfg = load_config("tiny_test")
    shapes = jax.eval_shape(lambda: ConditionalUNet.from_config(cfg).init_params(jax.random.key(0)))
    return ckpt.restore({"generator": shapes, "fake_score": shapes, "generator_ema": shapes}, step)


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, pretrained):
    full = _train(tmp_path / "full", pretrained)
    assert full.returncode == 0, full.stderr[-2000:]
    first = _train(tmp_path / "resumed", pretrained, "--sigterm_at_step=2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2"]   # saved on SIGTERM, then stopped
    second = _train(tmp_path / "resumed", pretrained)
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = _restore(tmp_path / "full", 6), _restore(tmp_path / "resumed", 6)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_checkpoint_written_on_8_devices_restores_on_1(tmp_path, pretrained):
    run = _train(tmp_path / "w", pretrained, "--config.training.n_iters=2", "--config.mesh.data=2",
                 "--config.mesh.fsdp=4", "--config.mesh.fsdp_min_size=4096", devices=8)
    assert run.returncode == 0, run.stderr[-2000:]
    restored = _restore(tmp_path / "w", 2)   # this process has one device
    leaf = jax.tree_util.tree_leaves(restored["generator"])[0]
    assert len(leaf.sharding.device_set) == 1
    proc = run_cli("sfd_jax.sample", f"--checkpoint={tmp_path / 'w'}", "--n_per_class=1",
                   f"--out={tmp_path / 's.npz'}")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_cifar10_recipes_run_with_a_reduced_model(tmp_path):
    small = ["--config.model.ch=32", "--config.model.ch_mult=(1,2)", "--config.model.num_res_blocks=1",
             "--config.model.attn_resolutions=(8,)", "--config.data.image_size=16", "--config.training.n_iters=2",
             "--config.training.snapshot_freq=2", "--config.training.batch_size=4",
             "--config.training.visualization_samples=10", "--config.training.log_freq=1"]
    # Pretraining on an .npz dataset in the CIFAR layout (32x32 resized to the reduced model's 16x16).
    r = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=r.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8),
             labels=r.integers(0, 10, 20))
    pre = run_cli("sfd_jax.train", "--config=configs/cifar10_train.py", f"--workdir={tmp_path / 'pre'}", *small,
                  "--config.data.dataset=npz", f"--config.data.path={tmp_path / 'data.npz'}",
                  "--config.sampling.grid_steps=2")
    assert pre.returncode == 0, pre.stderr[-2000:]
    sfd = run_cli("sfd_jax.train", "--config=configs/cifar10_sfd.py", f"--workdir={tmp_path / 'sfd'}", *small,
                  f"--config.init_checkpoint={tmp_path / 'pre'}")
    assert sfd.returncode == 0, sfd.stderr[-2000:]
    for run, items in (("pre", {"model", "ema", "opt"}), ("sfd", {"generator", "generator_ema", "fake_score"})):
        d = tmp_path / run
        assert items <= set(os.listdir(d / "checkpoints" / "2"))
        assert {"sample-2.png", "sample-ema-2.png"} <= set(os.listdir(d / "samples"))
        records = [json.loads(line) for line in open(d / "metrics.jsonl")]
        assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(v) for v in records[-1].values())
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(d / "tb"))
        assert json.load(open(d / "config.json"))["mode"] == ("pretrain" if run == "pre" else "sfd")


@pytest.mark.parametrize("case", ["unknown_mode", "pretrain_without_optim", "forget_out_of_range", "missing_init", "wrong_shape_init",
                                  "missing_dataset", "wrong_format_dataset", "other_recipe_workdir"])
def test_bad_input_is_one_line_and_leaves_the_workdir_alone(case, tmp_path, pretrained):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("precious")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    wide = make_pretrained(tmp_path / "wide", load_config("tiny_test", **{"model.ch": 64})) \
        if case == "wrong_shape_init" else None
    if case == "other_recipe_workdir":
        (workdir / "config.json").write_text(load_config("cifar10_sfd").to_json())
    base = ["--config=tests/configs/tiny_test.py", f"--workdir={workdir}", f"--config.init_checkpoint={pretrained}"]
    if "dataset" in case:   # a pretraining recipe, reduced
        base = ["--config=configs/cifar10_train.py", f"--workdir={workdir}", "--config.model.ch=32",
                "--config.model.ch_mult=(1,)", "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=()",
                "--config.data.image_size=8"]
    args, expect = {
        "unknown_mode": (["--config.mode=finetune"], "config.mode must be one of"),
        "pretrain_without_optim": (["--config.mode=pretrain"], "no optim section"),
        "forget_out_of_range": (["--config.distill.label_to_forget=10"], "label_to_forget=10 is outside"),
        "missing_init": ([f"--config.init_checkpoint={tmp_path / 'nope'}"], "does not exist"),
        "wrong_shape_init": ([f"--config.init_checkpoint={wide}"], "null_classes_emb"),
        "missing_dataset": (["--config.data.dataset=npz",
                             f"--config.data.path={tmp_path / 'none.npz'}"], "none.npz"),
        "wrong_format_dataset": (["--config.data.dataset=npz",
                                  f"--config.data.path={tmp_path / 'bad.npz'}"], "bad.npz"),
        "other_recipe_workdir": ([], "different"),
    }[case]
    before = sorted(os.listdir(workdir))
    proc = run_cli("sfd_jax.train", *base, *args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]
    assert sorted(os.listdir(workdir)) == before and (workdir / "keep.txt").read_text() == "precious"
