"""``python -m sfd_jax.demo --task=sd --fast``: every stage shrunk to a few steps, every output file checked, stages
reused on a second run with another concept pair. In-process (``run_sd_demo``): the run is compile-bound (a dozen
programs, ~15-20 minutes on two busy CPU cores), longer than the CLI helper's timeout."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli

MOD = "sfd_jax.demo"
FILES = ("report.md", "report.json", "samples_teacher.npz", "samples_student.npz", "samples_generator.npz",
         "grid_real.png", "grid_teacher.png", "grid_student.png", "grid_generator.png")


@pytest.mark.slow
def test_fast_sd_demo_writes_every_output_and_reuses_stages(tmp_path, capsys):
    from PIL import Image

    from sfd_jax.sd.demo import run_sd_demo
    wd = tmp_path / "demo"
    run_sd_demo(str(wd), forget="three", override="eight", fast=True, compile_cache=False)
    for name in FILES:
        assert (wd / name).is_file(), name
    report = json.loads((wd / "report.json").read_text())
    assert report["fast"] is True and report["forget"] == "three" and report["override"] == "eight"
    assert set(report["per_concept"]) == set(report["class_names"]) and len(report["class_names"]) == 10
    for v in report["per_concept"].values():
        assert set(v) == {"teacher", "student", "generator"} and all(0 <= x <= 1 for x in v.values())
    assert set(report["targets"]) == {"forgotten_rate", "override_rate", "others_kept_ratio"}
    assert np.isfinite(report["world"]["vae"]["held_out_mse"])
    for name in ("samples_teacher", "samples_student", "samples_generator"):
        with np.load(wd / f"{name}.npz") as z:
            assert z["images"].dtype == np.uint8 and z["images"].shape == (40, 8, 8, 1), name
            np.testing.assert_array_equal(z["labels"], np.repeat(np.arange(10), 4))
    assert Image.open(wd / "grid_generator.png").size[1] > Image.open(wd / "grid_generator.png").size[0]
    md = (wd / "report.md").read_text()
    assert 'forgetting "three" (override "eight")' in md and "| concept | teacher | student |" in md
    stages = report["timings_s"]["stages"]
    assert {"world", "teacher", "export", "student", "forget_three_to_eight", "classifier"} <= set(stages)

    # The world's forgetting checkpoint through the user-facing commands: `evaluate prompts` and `sample --prompt`
    # (base pipeline and t_init read from the checkpoint's config) write the same image for the same seed.
    (tmp_path / "p.txt").write_text("a photo of a three\n")
    run_cli("sfd_jax.evaluate", "prompts", f"--checkpoint={wd / 'forget_three_to_eight'}",
            f"--prompts={tmp_path / 'p.txt'}", "--seeds=0-1", f"--outdir={tmp_path / 'ev'}", "--noprogress",
            check=True)
    run_cli("sfd_jax.sample", f"--checkpoint={wd / 'forget_three_to_eight'}", "--prompt=a photo of a three",
            "--seed=0", "--n_per_class=1", f"--out={tmp_path / 'sa'}", check=True)
    ev = sorted((tmp_path / "ev").rglob("*.png"))
    sa = sorted((tmp_path / "sa").rglob("*.png"))
    assert [p.name for p in ev] == ["00000.png", "00001.png"] and [p.name for p in sa] == ["00000.png"]
    a, b = (np.asarray(Image.open(p)) for p in (ev[0], sa[0]))
    assert a.shape == b.shape and a.shape[:2] == (8, 8)
    np.testing.assert_array_equal(a, b)

    run_sd_demo(str(wd), forget="one", fast=True, compile_cache=False)
    again = json.loads((wd / "report.json").read_text())["timings_s"]["stages"]
    for stage in ("world", "teacher", "student", "classifier", "samples_teacher", "samples_student"):
        assert again[stage]["reused"], stage
    assert not again["forget_one_to_two"]["reused"]
    assert "reusing" in capsys.readouterr().out


def test_bad_sd_concept_is_one_line(tmp_path):
    proc = run_cli(MOD, "--task=sd", f"--workdir={tmp_path / 'd'}", "--forget=eleven")
    assert proc.returncode != 0
    assert "--forget 'eleven' is not a class name" in proc.stderr.strip().splitlines()[-1]
