"""``python -m sfd_jax.demo``: every output with the right keys and shapes, and a re-run that reuses every stage.

Runs the demo's ``--fast`` variant (each stage shrunk to seconds; the numbers mean nothing). The default run's
numbers are measured by running the demo itself (README, "The demo").
"""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tests.conftest import last_line, run_cli

MOD = "sfd_jax.demo"
STAGES = ("teacher", "sfd_forget3", "classifier", "samples_teacher", "samples_generator")


def _check_samples(path):
    with np.load(path) as z:
        assert sorted(z.files) == ["images", "labels"]
        images, labels = z["images"], z["labels"]
    assert images.dtype == np.uint8 and images.shape == (1000, 8, 8, 1)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [100] * 10)


def test_fast_demo_writes_every_output_then_reuses_every_stage(tmp_path):
    wd = tmp_path / "demo"
    first = run_cli(MOD, f"--workdir={wd}", "--forget=3", "--fast", "--noprogress", check=True)
    assert "SFD digits demo — forgotten digit 3" in first.stdout           # the summary table
    assert "--fast: numbers are meaningless" in first.stdout

    for name in ("samples_teacher.npz", "samples_generator.npz"):
        _check_samples(wd / name)
    for name in ("grid_real.png", "grid_teacher.png", "grid_generator.png"):
        img = Image.open(wd / name)
        # ten rows (one per class) of ten 8x8 images with 1-pixel gaps, upscaled 4x
        assert img.size == (4 * (10 * 9 + 1), 4 * (10 * 9 + 1)), name
    report = json.loads((wd / "report.json").read_text())
    assert report["forget_class"] == 3 and report["fast"] is True
    assert set(report["targets"]) == {"classifier_held_out_accuracy", "teacher_mean_accuracy",
                                      "generator_forgotten_class_accuracy", "generator_remaining_mean_accuracy"}
    for check in report["targets"].values():
        assert set(check) == {"what", "value", "target", "pass"} and 0.0 <= check["value"] <= 1.0
    assert report["all_targets_met"] == all(c["pass"] for c in report["targets"].values())
    assert report["generator_samples"]["forgotten"]["n"] == 100
    assert set(report["teacher_samples"]["per_class"]) == {str(c) for c in range(10)}
    stages = report["timings_s"]["stages"]
    assert set(STAGES) <= set(stages) and not any(stages[s]["reused"] for s in STAGES)
    md = (wd / "report.md").read_text()
    assert "forgetting digit 3" in md and "| target | value | required | result |" in md
    teacher_steps = sorted(p.name for p in (wd / "teacher" / "checkpoints").iterdir())

    second = run_cli(MOD, f"--workdir={wd}", "--forget=3", "--fast", "--noprogress", check=True)
    for stage in STAGES:
        assert f"{stage}: reusing" in second.stdout, stage
    assert "sfd:" not in second.stderr and "pretrain:" not in second.stderr   # no training progress bar
    assert sorted(p.name for p in (wd / "teacher" / "checkpoints").iterdir()) == teacher_steps
    again = json.loads((wd / "report.json").read_text())
    assert all(again["timings_s"]["stages"][s]["reused"] for s in STAGES)
    assert again["targets"] == report["targets"]                       # same samples, same numbers
    _check_samples(wd / "samples_generator.npz")

    # Another digit in the same workdir: teacher, classifier and teacher samples are shared; SFD and the
    # generator's samples are not.
    third = run_cli(MOD, f"--workdir={wd}", "--forget=5", "--fast", "--noprogress", check=True)
    for stage in ("teacher", "classifier", "samples_teacher"):
        assert f"{stage}: reusing" in third.stdout, stage
    assert "samples_generator: reusing" not in third.stdout
    other = json.loads((wd / "report.json").read_text())
    assert other["forget_class"] == 5 and other["generator_samples"]["forgotten"]["n"] == 100
    assert (wd / "sfd_forget5" / "checkpoints").is_dir() and (wd / "sfd_forget3" / "checkpoints").is_dir()


def test_bad_forget_class_is_one_line(tmp_path):
    proc = run_cli(MOD, f"--workdir={tmp_path / 'd'}", "--forget=10")
    assert proc.returncode == 2
    assert last_line(proc.stderr) == "sfd_jax.demo: error: --forget must be a digit 0..9, got 10"
    assert not (tmp_path / "d").exists()


def test_refused_teacher_workdir_exits_with_one_line_while_the_classifier_trains(tmp_path):
    """The teacher stage refuses a workdir of another recipe while the evaluation classifier is training in the
    background: the demo stops that stage, waits for it and exits with the one-line error. (A main thread leaving
    under a running background computation once aborted the SD demo with exit 134, "terminate called ...".)"""
    teacher = tmp_path / "d" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "config.json").write_text(json.dumps({"mode": "sfd", "model": {"ch": 7}}))
    # The full-size classifier (not --fast) is still training when the teacher stage refuses.
    proc = run_cli(MOD, f"--workdir={tmp_path / 'd'}", "--noprogress")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc.stderr).startswith("sfd_jax.demo: error: ") and "terminate called" not in proc.stderr
    assert not (tmp_path / "d" / "classifier" / "checkpoints").exists()   # the background stage was stopped
