"""Stable Diffusion SFD training on a tiny random pipeline (no torch): gradient accumulation, the end-to-end recipe
run with kill-and-resume, its checkpoint through export/evaluate, bad input. 1 vs 8 devices and multi-process:
tests/method/test_task_twins.py."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import last_line, load_config, run_cli

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from sfd_jax.sd.random_pipeline import write_random_pipeline
    return write_random_pipeline(str(tmp_path_factory.mktemp("tiny_sd")), "tiny", seed=0)


def _tiny(pipeline, **overrides):
    from sfd_jax.sd.config import tiny_sd_overrides
    return tiny_sd_overrides(load_config("sd15_celebrity", **overrides), pipeline)


def test_gradient_accumulation_sums_the_rounds(pipeline):
    """batch 4 as 2 rounds of 2: the step's losses are the sums of the round losses with keys fold_in(k, r)."""
    from sfd_jax.sd.trainer import SDTrainer
    from sfd_jax.sd.step import make_round_losses
    import tempfile

    cfg = _tiny(pipeline)
    cfg.training.batch, cfg.training.batch_per_device = 4, 2
    tr = SDTrainer(cfg, tempfile.mkdtemp())
    assert tr.settings().rounds == 2
    state, sh, frozen, frozen_sh, txs = tr.build()
    batch = tr.device_batch(0)
    rl = make_round_losses(tr.comps.unet, tr.comps.text_encoder, tr.alphas_cumprod, tr.settings())
    k_sg, _ = jax.random.split(jax.random.fold_in(tr.root_key, 0))
    sg_rounds = [jax.jit(rl.sg)(state.fake_score, frozen, state.generator,
                                {k: v[r] for k, v in batch.items()}, jax.random.fold_in(k_sg, r))[1]
                 for r in range(2)]
    step = tr.make_step(sh, frozen_sh, txs)
    _, m = step(state, frozen, batch, tr.root_key)
    np.testing.assert_allclose(float(m["sg_remain_loss"]), float(sg_rounds[0][0] + sg_rounds[1][0]), rtol=1e-5)
    np.testing.assert_allclose(float(m["sg_forget_loss"]), float(sg_rounds[0][1] + sg_rounds[1][1]), rtol=1e-5)
    assert float(m["sg_nan_dropped"]) == 0 and float(m["g_nan_dropped"]) == 0


def test_ema_beta_follows_the_half_life_and_ramp_up():
    from sfd_jax.sd.step import ema_beta
    assert float(ema_beta(jnp.int32(0), 8, 500.0, 0.05)) == 0.0          # the first update copies G
    # step 100, batch 8: nimg 800, ramp-up h = 40 images -> beta = 0.5^(8/40)
    np.testing.assert_allclose(float(ema_beta(jnp.int32(100), 8, 500.0, 0.05)), 0.5 ** (8 / 40), rtol=1e-6)
    # late: h = 500 kimg
    np.testing.assert_allclose(float(ema_beta(jnp.int32(10 ** 7), 8, 500.0, 0.05)), 0.5 ** (8 / 5e5), rtol=1e-6)


# ------------------------------------------------------------------------------------------- end to end
def _train(workdir, pipeline, *extra):
    return run_cli("sfd_jax.train", "--config=configs/sd15_celebrity.py", f"--workdir={workdir}",
                   f"--config.sd.model={pipeline}", "--config.sd.resolution=16", "--config.dtype=float32",
                   "--config.training.batch=2", "--config.training.duration_kimg=0.006",
                   "--config.training.tick_kimg=0.002", "--config.training.snap_ticks=1",
                   "--config.training.dump_ticks=1", "--config.training.grid_items=2", *extra)


def _restore_all(workdir, step):
    from sfd_jax.checkpoint import Checkpointer
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    items = [i for i in ckpt.items(step) if i not in ("config", "meta")]
    return {i: ckpt.item_shapes(i, step) for i in items}, ckpt


@pytest.mark.slow
def test_tiny_celebrity_run_end_to_end_resumes_exactly_and_exports(tmp_path, pipeline):
    full = _train(tmp_path / "full", pipeline)
    assert full.returncode == 0, full.stderr[-3000:]
    wd = tmp_path / "full"
    assert sorted(os.listdir(wd / "checkpoints"), key=int) == ["1", "2", "3"]
    samples = sorted(os.listdir(wd / "samples"))
    for k in (1, 2, 4):
        assert f"fakes_init_{k}.png" in samples and f"fakes_000000006_{k}.png" in samples
    records = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("sg_remain_loss", "sg_forget_loss", "g_remain_loss", "g_forget_loss", "images_per_s", "kimg"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert os.listdir(wd / "tb") and os.path.isfile(wd / "config.json")

    first = _train(tmp_path / "resumed", pipeline, "--sigterm_at_step=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints"), key=int) == ["1", "2"]
    second = _train(tmp_path / "resumed", pipeline)
    assert second.returncode == 0, second.stderr[-3000:]
    shapes, ckpt_a = _restore_all(wd, 3)
    _, ckpt_b = _restore_all(tmp_path / "resumed", 3)
    assert set(shapes) == {"generator", "fake_score", "g_opt", "sg_opt"}   # the recipe has no EMA
    a, b = ckpt_a.restore(shapes, 3), ckpt_b.restore(shapes, 3)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # fp16-emulated recipe: every trained weight is an fp16 value
    for leaf in jax.tree_util.tree_leaves(a["generator"]):
        leaf = np.asarray(leaf)
        np.testing.assert_array_equal(leaf.astype(np.float16).astype(np.float32), leaf)

    # the checkpoint works with the SD tools: export to diffusers, then one-step prompt evaluation
    out = tmp_path / "exported"
    exp = run_cli("sfd_jax.convert", "export-diffusers", f"--checkpoint={wd}", f"--base={pipeline}", f"--out={out}")
    assert exp.returncode == 0, exp.stderr[-2000:]
    from sfd_jax.sd.pipeline import load_components
    comps = load_components(str(out), components=("unet",))
    for x, y in zip(jax.tree_util.tree_leaves(comps.unet_params), jax.tree_util.tree_leaves(a["generator"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ev = run_cli("sfd_jax.evaluate", "prompts", f"--checkpoint={wd}", "--prompts=configs/prompts/brad_pitt_val.txt",
                 "--seeds=0-1", f"--outdir={tmp_path / 'eval'}", "--resolution=16")
    assert ev.returncode == 0, ev.stderr[-2000:]
    folders = [d for d in os.listdir(tmp_path / "eval") if os.path.isdir(tmp_path / "eval" / d)]
    assert len(folders) == 6 and all(sorted(os.listdir(tmp_path / "eval" / d)) == ["00000.png", "00001.png"]
                                     for d in folders)
    sm = run_cli("sfd_jax.sample", f"--checkpoint={wd}", "--prompt=a photo of Brad Pitt", "--n_per_class=2", "--seed=0",
                 f"--out={tmp_path / 'sample'}")
    assert sm.returncode == 0, sm.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "sample" / "a photo of Brad Pitt")) == ["00000.png", "00001.png"]


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("override, message", [
    ("--config.distill.init_timestep=1000", "distill.init_timestep must be in [0, 999]"),
    ("--config.distill.cfg_train_fake=0.5", "distill.cfg_train_fake"),
    ("--config.prompts.forget=/nonexistent/prompts.txt", "/nonexistent/prompts.txt"),
    ("--config.prompts.remain=", "prompts.remain is required"),
    ("--config.optim.precision=fp8", "optim.precision"),
])
def test_bad_input_is_one_clear_line(tmp_path, pipeline, override, message):
    proc = _train(tmp_path / "wd", pipeline, override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in last_line(proc.stderr), last_line(proc.stderr)
    assert not os.path.exists(tmp_path / "wd")


def test_empty_prompt_file_and_unmatched_concept(tmp_path, pipeline):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    proc = _train(tmp_path / "wd", pipeline, f"--config.prompts.forget={empty}")
    assert proc.returncode == 2 and "empty" in last_line(proc.stderr), proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "wd")
    from sfd_jax.sd.task import SDPrompts
    cfg = _tiny(pipeline)
    cfg.prompts.concept_to_forget = "tom hanks"
    shown = []
    prompts = SDPrompts(cfg, warn=shown.append)
    assert len(shown) == 1 and "matches nothing in 50 forget prompt(s)" in shown[0] and "Brad Pitt" in shown[0]
    assert len(prompts.strings) > 50


@pytest.mark.slow
def test_bench_reports_the_sd_step(tmp_path):
    proc = run_cli("sfd_jax.bench", "--config=configs/sd15_celebrity.py", "--sd_size=tiny",
                   "--config.sd.resolution=16", "--config.dtype=float32", "--batch=4", "--steps=1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(last_line(proc.stdout))
    assert r["mode"] == "sd_sfd" and r["batch"] == 4 and r["rounds"] == 4 and r["micro_batch"] == 1
    assert r["images_per_s"] > 0 and r["flops_per_image"] > 0 and r["peak_memory_bytes_per_device"] > 0
    assert set(r["losses"]) >= {"sg_remain_loss", "sg_forget_loss", "g_remain_loss", "g_forget_loss"}
