"""Several classes forgotten in one DDPM run: the task's draws, the config field on the command line, the one-line
refusals, the resume check, and that a single target's step is the one it always was."""
from __future__ import annotations

import hashlib
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from sfd_jax.cli_utils import UsageError
from sfd_jax.ddpm.task import DDPMTask
from tests.conftest import ROOT, load_config


def _task(forget, override=1, pseudo="rand"):
    cfg = load_config("tiny_test")
    cfg.distill.label_to_forget = forget
    cfg.distill.label_to_override = override
    cfg.distill.pseudo_label_type = pseudo
    return DDPMTask.from_config(cfg)


# ------------------------------------------------------------------------------------------------------ draws
def test_draws_for_several_forgotten_classes():
    task = _task((2, 5, 7), (1, 4, 1))
    assert task.label_to_forget == (2, 5, 7) and task.label_to_override == (1, 4, 1)
    assert task.remain_classes.tolist() == [0, 1, 3, 4, 6, 8, 9]
    f = np.asarray(task.forget_labels(jax.random.key(0), 6000))
    assert set(np.unique(f)) == {2, 5, 7}
    assert all(abs(np.mean(f == k) - 1 / 3) < 0.03 for k in (2, 5, 7))          # uniform over the forgotten set
    o = np.asarray(task.override_labels(jax.random.key(1), 6000, jnp.asarray(f)))
    np.testing.assert_array_equal(o, np.select([f == 2, f == 5, f == 7], [1, 4, 1]))   # each sample its class's
    r = np.asarray(task.remain_labels(jax.random.key(2), 6000))
    assert set(np.unique(r)) == {0, 1, 3, 4, 6, 8, 9}
    # one override for all; 'rand': uniform over the kept classes only
    assert (np.asarray(_task((2, 5, 7), 1).override_labels(jax.random.key(1), 50, jnp.asarray(f[:50]))) == 1).all()
    rand = np.asarray(_task((2, 5, 7), None).override_labels(jax.random.key(3), 7000, jnp.asarray(f[:7000])))
    assert set(np.unique(rand)) == {0, 1, 3, 4, 6, 8, 9} and abs(np.mean(rand == 9) - 1 / 7) < 0.02
    # 'amax': every forgotten class is masked (the classifier prefers 2, then 5, then 7, then 3)
    logits = jnp.array([[0.0, 0.0, 9.0, 4.0, 0.0, 8.0, 0.0, 7.0, 0.0, 0.0]])
    assert int(_task((2, 5, 7), None, "amax").classifier_labels(jax.random.key(0), logits)[0]) == 3
    assert int(_task(2, None, "amax").classifier_labels(jax.random.key(0), logits)[0]) == 5


def test_single_target_draws_are_the_single_target_formulas():
    """One forgotten class: the constant class, no key used; 'rand' is the original's randint(0, n-1) with the
    forgotten class mapped to n-1 — whether the config says 3 or (3,)."""
    for forget in (3, (3,), [3]):
        task = _task(forget, None)
        assert task.label_to_forget == (3,) and task.n_forget == 1
        np.testing.assert_array_equal(np.asarray(task.forget_labels(None, 5)), [3] * 5)
        key = jax.random.key(7)
        r = jax.random.randint(key, (400,), 0, 9)
        np.testing.assert_array_equal(np.asarray(task.override_labels(key, 400)),
                                      np.asarray(jnp.where(r == 3, 9, r)))
    assert _task(3) == _task((3,)) == _task(3, (1,))


# -------------------------------------------------------------------------------------------- command line
def _parse(monkeypatch, *overrides):
    """``python -m sfd_jax.train``'s --config flag (DEFINE_config_file, lock_config=False), parsed in-process."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "recipe", flag_values=fv, lock_config=False)
    argv = ["sfd_jax.train", f"--config={ROOT / 'tests/configs/tiny_test.py'}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    fv(argv)
    return fv.config


@pytest.mark.parametrize("args, forget, override", [
    (["--config.distill.label_to_forget=3"], 3, 1),
    (["--config.distill.label_to_forget=(3,)"], 3, 1),                  # one target is stored as the int
    (["--config.distill.label_to_forget=(2,5,7)", "--config.distill.label_to_override=(1,1,1)"], (2, 5, 7), (1, 1, 1)),
    (["--config.distill.label_to_forget=2,5,7", "--config.distill.label_to_override=None",
      "--config.distill.pseudo_label_type=rand"], (2, 5, 7), None),
])
def test_both_forms_parse_on_the_command_line(monkeypatch, tmp_path, args, forget, override):
    from sfd_jax import train
    cfg = _parse(monkeypatch, *args)
    assert cfg.distill.label_to_forget == forget and cfg.distill.label_to_override == override
    assert json.loads(cfg.to_json())["distill"]["label_to_forget"] == (list(forget) if isinstance(forget, tuple)
                                                                      else forget)
    task = DDPMTask.from_config(cfg)
    assert task.label_to_forget == (forget if isinstance(forget, tuple) else (forget,))
    cfg.init_checkpoint = str(ROOT / "tests")           # any existing path: nothing is read before run()
    assert train.make_trainer(cfg, str(tmp_path / "wd")).config.distill.label_to_forget == forget


@pytest.mark.parametrize("forget, override, message", [
    ((2, 5, 2), 1, "distill.label_to_forget=(2, 5, 2) lists class 2 twice"),
    ((2, 10), 1, "distill.label_to_forget=(2, 10) holds 10, outside [0, 10)"),
    (10, 1, "distill.label_to_forget=10 is outside [-1, 10)"),
    ((2, 5, 7), (1, 5, 1), "distill.label_to_override=(1, 5, 1) holds 5, one of the forgotten classes"),
    ((2, 5, 7), (1, 1), "distill.label_to_override=(1, 1) has 2 entries but distill.label_to_forget=(2, 5, 7) has 3"),
    ((2, 5), (1, 12), "distill.label_to_override=(1, 12) holds 12, outside [0, 10)"),
    ("2,5", 1, "distill.label_to_forget='2,5': expected a class (int) or a tuple of classes"),
])
def test_bad_targets_are_one_line(tmp_path, forget, override, message):
    from sfd_jax import train
    cfg = load_config("tiny_test", init_checkpoint=str(ROOT))
    cfg.distill.label_to_forget, cfg.distill.label_to_override = forget, override
    with pytest.raises(UsageError) as e:
        train.make_trainer(cfg, str(tmp_path / "wd"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "wd").exists()


def test_baselines_refuse_several_classes_in_one_line(tmp_path):
    from sfd_jax import train
    from sfd_jax.ddpm.baselines.common import forget_label, remain_classes
    cfg = load_config("digits_retrain")
    cfg.unlearn.label_to_forget = (2, 5)
    with pytest.raises(UsageError, match=r"^unlearn.label_to_forget=\(2, 5\): the baselines .* forget one class"):
        train.make_trainer(cfg, str(tmp_path / "wd"))
    cfg.unlearn.label_to_forget = (4,)
    assert cfg.unlearn.label_to_forget == 4 and forget_label(cfg) == 4 and 4 not in remain_classes(cfg)


def test_resume_check_treats_3_and_a_1_tuple_alike(tmp_path):
    """A workdir whose config.json holds the int 3 (as every run before several targets existed) resumes with
    label_to_forget=(3,); (3, 5) is a changed setting."""
    from sfd_jax.ddpm.trainer import Trainer
    wd = tmp_path / "w"
    (wd / "checkpoints" / "4").mkdir(parents=True)
    old = json.loads(load_config("tiny_test", init_checkpoint=str(ROOT)).to_json())
    old["distill"]["label_to_forget"] = 3
    (wd / "config.json").write_text(json.dumps(old))
    cfg = load_config("tiny_test", init_checkpoint=str(ROOT))
    cfg.distill.label_to_forget = (3,)
    Trainer(cfg, str(wd)).check_resume_config()
    cfg.distill.label_to_forget = (3, 5)
    with pytest.raises(UsageError, match=r"other settings: distill.label_to_forget \(3 -> \[3, 5\]\)"):
        Trainer(cfg, str(wd)).check_resume_config()


# ------------------------------------------------------------------------------------------------------ steps
# sha256[:16] of one step's outputs (state and metrics) on the micro config below, recorded with the code before
# several targets existed (jax 0.10.2 on x86-64 CPU; other XLA versions round differently), and recorded again
# when the UNet's GroupNorm became models.group_norm (fp32 rounding of other sums; the single-target code path is
# unchanged). That record is from an AVX2 CPU: the vectorised sums may round differently with AVX-512, so the
# key holds the instruction set too.
RECORDED = {("0.10.2", "avx2", 3, 1): "5c83c9b5732c03fe"}


def _isa() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    return "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else "other"


def _micro_step(forget, override):
    from sfd_jax.ddpm import diffusion
    from sfd_jax.ddpm.steps import make_sfd_step
    from sfd_jax.distill.state import SFDState, make_optimizer
    from sfd_jax.models.ddpm_unet import ConditionalUNet
    cfg = load_config("tiny_test", **{"model.ch_mult": (1,), "model.attn_resolutions": (), "data.image_size": 8})
    cfg.distill.label_to_forget, cfg.distill.label_to_override = forget, override
    model = ConditionalUNet.from_config(cfg)
    p = model.init_params(jax.random.key(0))
    g_tx, sg_tx = make_optimizer(cfg.g_optim, "value"), make_optimizer(cfg.sg_optim, "value")
    st = SFDState(step=jnp.int32(0), generator=p, generator_ema=p, fake_score=p, g_opt=g_tx.init(p),
                  sg_opt=sg_tx.init(p))
    _, ac = diffusion.schedule_from_config(cfg)
    task = DDPMTask.from_config(cfg)
    step = jax.jit(make_sfd_step(model, cfg, task, ac, g_tx, sg_tx, batch_size=4))
    return cfg, task, step(st, p, jax.random.key(1))


def _digest(tree) -> str:
    h = hashlib.sha256()
    for x in jax.tree_util.tree_leaves(tree):
        h.update(np.asarray(x).tobytes())
    return h.hexdigest()[:16]


def test_single_target_step_is_bitwise_the_recorded_one():
    cfg3, task3, out = _micro_step(3, 1)
    cfg_t = load_config("tiny_test", **{"model.ch_mult": (1,), "model.attn_resolutions": (), "data.image_size": 8})
    cfg_t.distill.label_to_forget, cfg_t.distill.label_to_override = (3,), (1,)
    # (3,) gives the same config and the same task as 3, hence the same jitted step and outputs
    assert cfg_t.to_json() == cfg3.to_json() and DDPMTask.from_config(cfg_t) == task3
    digest = _digest(out)
    recorded = RECORDED.get((jax.__version__, _isa(), 3, 1))
    if recorded is not None:          # the recorded XLA version: bitwise the pre-change step
        assert digest == recorded
    new, metrics = out
    assert int(new.step) == 1 and all(np.isfinite(float(v)) for v in metrics.values())


def test_several_targets_step_runs():
    _, task, (new, metrics) = _micro_step((2, 5, 7), (1, 4, 1))
    assert task.n_forget == 3 and int(new.step) == 1
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["sg_forget_loss"]) > 0 and float(metrics["g_forget_loss"]) != 0


def test_forgetting_metrics_of_several_classes():
    from sfd_jax.eval.forgetting import forgetting_metrics, format_table
    labels = np.repeat(np.arange(4), 4)
    pred = labels.copy()
    pred[labels == 1] = 0                 # class 1 forgotten: its samples look like 0
    pred[labels == 2] = 3                 # class 2 forgotten too, its samples look like 3 ...
    pred[8] = 2                           # ... but one is still recognised as 2
    pred[12] = 0                          # one sample of class 3 (kept) wrong
    logits = np.eye(4)[pred] * 10.0
    r = forgetting_metrics(logits, labels, (1, 2))
    assert r["forget_class"] == [1, 2]
    assert r["forgotten_per_class"]["1"]["acc"] == 0.0 and r["forgotten_per_class"]["2"]["acc"] == 0.25
    assert r["forgotten"]["n"] == 8 and r["forgotten"]["acc"] == pytest.approx(1 / 8)
    assert r["mean_accuracy_remaining"] == pytest.approx((1.0 + 0.75) / 2)     # classes 0 and 3
    single = forgetting_metrics(logits, labels, 2)
    assert forgetting_metrics(logits, labels, (2,)) == single and "forgotten_per_class" not in single
    assert "forgotten class 1" in format_table(r) and "forgotten class 2" in format_table(r)


# ------------------------------------------------------------------------------------------------------- demo
def test_demo_flags_names_and_refusals():
    from sfd_jax.ddpm.demo import check_digits, run_names, sfd_config
    from sfd_jax.demo import parse_digits
    assert parse_digits("2,5,7", "--forget") == (2, 5, 7) and parse_digits("3", "--forget") == (3,)
    for text, message in (("10", "--forget must be a digit 0..9, got 10"),
                          ("2,x", "--forget must be digits 0..9 separated by commas, got '2,x'")):
        with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
            parse_digits(text, "--forget")
    for forget, override, message in (((2, 5, 2), None, "--forget lists digit 2 twice"),
                                      ((2, 5, 7), (1, 1), "--override must be one digit 0..9 or one per forgotten"),
                                      ((2, 5, 7), (5,), "--override digit 5 is one of the forgotten digits")):
        with pytest.raises(UsageError, match=re.escape(message)):
            check_digits(forget, override)
    # the default single-digit run keeps its names; others tag theirs (no file of another run is overwritten)
    assert run_names(3)["run"] == "sfd_forget3" and run_names(3)["report_json"] == "report.json"
    n = run_names((2, 5, 7))
    assert (n["run"], n["report_json"], n["samples_generator"], n["grid_generator"]) == (
        "sfd_forget2-5-7", "report_forget2-5-7.json", "samples_generator_forget2-5-7.npz",
        "grid_generator_forget2-5-7.png")
    assert run_names((2, 5, 7), (1, 1, 1))["run"] == "sfd_forget2-5-7_to1"
    assert run_names((2, 5, 7), (1, 4, 1))["run"] == "sfd_forget2-5-7_to1-4-1"
    c = sfd_config("t", (2, 5, 7), override=(1, 1, 1))
    assert c.distill.label_to_forget == (2, 5, 7) and c.distill.label_to_override == 1
    assert sfd_config("t", (1, 5)).distill.label_to_override is None       # the recipe's override forgotten: 'rand'
    assert sfd_config("t", 3).to_json() == sfd_config("t", (3,)).to_json()
