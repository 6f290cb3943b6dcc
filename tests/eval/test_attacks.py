"""The DDPM attacks on tiny random models: latent raises the attacker's objective within its budget (one-step and
DDIM paths), relearn lowers its loss and reports per k, and ``evaluate attack`` refuses bad input in one line."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from sfd_jax.attacks.spec import AttackSpec
from sfd_jax.eval.classifier_train import save_classifier
from sfd_jax.models.classifier import ClassifierConfig, init_variables
from tests.conftest import last_line, run_cli


def _classifier(path, seed: int, width: int = 8):
    cfg = ClassifierConfig(arch="cnn", n_classes=10, image_size=8, channels=1, width=width)
    save_classifier(path, init_variables(cfg, jax.random.key(seed)), cfg, {"train_config": {"seed": seed}})
    return str(path)


def _ddpm_checkpoint(path, kind: str):
    """A freshly initialised 8x8x1 UNet (ch 32, one level with attention) saved as a distilled ('generator') or a
    pretrained ('model', 2-step DDIM with guidance 2 as its sampler) checkpoint of digits."""
    from sfd_jax.checkpoint import Checkpointer
    from sfd_jax.ddpm.config import distill_config, pretrain_config
    from sfd_jax.models.ddpm_unet import ConditionalUNet

    if kind == "distilled":
        cfg = distill_config(sg_lr=3e-5, sg_forget_coef=0.01, g_forget_coef=0.01, label_to_forget=3,
                             dataset="digits", image_size=8, ch_mult=(1,))
    else:
        cfg = pretrain_config(dataset="digits", image_size=8, ch_mult=(1,))
        cfg.sampling.grid_steps, cfg.sampling.grid_cond_scale = 2, 2.0
    cfg.model.ch, cfg.model.num_res_blocks, cfg.model.attn_resolutions = 32, 1, ()
    cfg.model.in_channels = cfg.model.out_ch = cfg.data.channels = 1
    params = ConditionalUNet.from_config(cfg).init_params(jax.random.key(0))
    ckpt = Checkpointer(path / "checkpoints")
    items = {"generator": params} if kind == "distilled" else {"model": params}
    ckpt.save(0, items, config=cfg)
    ckpt.wait()
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("attacks")
    return {"one_step": _ddpm_checkpoint(d / "gen", "distilled"), "ddim": _ddpm_checkpoint(d / "teacher", "pretrained"),
            "attacker": _classifier(d / "attacker", 0), "judge": _classifier(d / "judge", 1, width=16), "dir": d}


@pytest.mark.parametrize("model", ["one_step", "ddim"])
def test_latent_raises_the_attackers_objective_within_its_budget(world, model):
    from sfd_jax.attacks import latent
    spec = AttackSpec(kind="latent", checkpoint=world[model], target="3", attacker_classifier=world["attacker"],
                      judge_classifier=world["judge"], out=str(world["dir"] / f"latent_{model}"), n=4, steps=6,
                      lr=0.3, budget=0.25, weights="raw")
    res = latent.run(spec, progress=False)
    row, obj = res.rows[0], res.extra["objective"]
    assert len(obj) == spec.steps + 1 and obj[-1] > obj[0] + 1e-3, obj
    assert row["objective_pre"] == obj[0] and row["objective_post"] == obj[-1]
    assert 0 < row["mean_delta_rms"] <= row["max_delta_rms"] <= spec.budget * (1 + 1e-5)
    assert row["max_delta_rms"] > 0.9 * spec.budget           # Adam at lr 0.3 reaches the ball's edge: projected
    assert row["sampler"] == model and row["nfe_per_image"] == (1 if model == "one_step" else 4)
    for key in ("pre_judge", "post_judge", "pre_attacker", "post_attacker"):
        assert 0.0 <= row[key] <= 1.0
    assert sum(row["post_judge_recognised_as"]) == spec.n and len(row["post_attacker_recognised_as"]) == 10
    assert res.attacker["fingerprint"] != res.judge["fingerprint"]
    js, cs = res.write()
    assert json.load(open(js))["rows"][0]["budget"] == spec.budget and open(cs).readline().startswith("kind,")
    with np.load(spec.out + ".npz") as z:
        assert z["pre"].shape == z["post"].shape == (4, 8, 8, 1) and z["post"].dtype == np.uint8


@pytest.mark.parametrize("model", ["one_step", "ddim"])
def test_relearn_lowers_its_loss_and_reports_every_k(world, model):
    import jax.numpy as jnp
    import optax
    from sfd_jax import parallel
    from sfd_jax.attacks import relearn
    from sfd_jax.attacks.ddpm_model import load_attacked_model

    spec = AttackSpec(kind="relearn", checkpoint=world[model], target="3", attacker_classifier=world["attacker"],
                      judge_classifier=world["judge"], out=str(world["dir"] / f"relearn_{model}"), n=4, steps=3,
                      lr=1e-3, k=(1, 2), eval_every=2, batch=4, weights="raw")
    am = load_attacked_model(spec)
    images = relearn.target_images(am.config, 3, 2, 0)
    assert images.shape == (2, 8, 8, 1) and images.min() >= -1 and images.max() <= 1
    tx = optax.adam(1e-3)
    step = relearn.make_relearn_step(am, 3, tx, 4, parallel.make_mesh())
    params = jax.tree_util.tree_map(jnp.array, am.params)
    opt, key = tx.init(params), jax.random.key(1)
    losses = []
    for _ in range(5):                                          # the same batch every step: the loss must fall
        params, opt, loss = step(params, opt, jnp.asarray(images), key)
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses

    res = relearn.run(spec, progress=False)
    assert [r["k"] for r in res.rows] == [1, 2]
    for r in res.rows:
        assert {"steps_to_50_judge", "steps_to_50_attacker", "pre_judge", "post_judge", "pre_attacker",
                "post_attacker", "steps_run", "wall_seconds"} <= set(r)
        assert r["steps_to_50_judge"] is None or r["steps_to_50_judge"] <= spec.steps
        assert r["steps_run"] <= spec.steps
        curve = res.extra["curves"][str(r["k"])]
        assert curve[0][0] == 0 and all(b[0] > a[0] for a, b in zip(curve, curve[1:]))
        if r["steps_to_50_judge"] is None:                      # ran to the end, judged at 2 and at the last step
            assert r["steps_run"] == 3 and [c[0] for c in curve] == [0, 2, 3]
    assert res.extra["objective"] == ("x0_regression_at_t_init" if model == "one_step" else "eps_prediction")


def _fails(*args, match: str):
    proc = run_cli("sfd_jax.evaluate", "attack", *args, "--progress=false")
    line = last_line(proc.stderr)
    assert proc.returncode == 2 and line.startswith("sfd_jax.evaluate: error:") and match in line, proc.stderr[-3000:]
    return proc


def test_attack_command_refuses_bad_input_in_one_line(world, tmp_path):
    helped = run_cli("sfd_jax.evaluate", "attack", "--helpshort")
    listed = {ln.split(":")[0].strip() for ln in helped.stdout.splitlines() if ln.startswith("  --")}
    assert helped.returncode == 0 and {"--kind", "--budget", "--k", "--judge_classifier"} <= listed
    assert "--classifier" not in listed and "--sampler" not in listed          # other subcommands' flags
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "a_file").write_text("x")
    base = [f"--target=3", f"--attacker_classifier={world['attacker']}", f"--out={tmp_path / 'r'}"]
    # The judge is the attacker: refused before the (unreadable) checkpoint is even opened, nothing written.
    _fails("--kind=latent", f"--checkpoint={tmp_path / 'not_a_run'}", *base,
           f"--judge_classifier={world['attacker']}", match="the judge classifier is the attacker classifier")
    assert not (tmp_path / "r.json").exists()
    ok = [*base, f"--judge_classifier={world['judge']}"]
    _fails("--kind=bogus", f"--checkpoint={world['one_step']}", *ok, match="--kind must be one of latent, relearn")
    _fails("--kind=relearn", f"--checkpoint={tmp_path / 'missing'}", *ok, match="does not exist")
    _fails("--kind=latent", f"--checkpoint={world['one_step']}", "--target=3",
           f"--attacker_classifier={world['attacker']}", f"--judge_classifier={world['judge']}",
           f"--out={tmp_path / 'a_file' / 'r'}", match="cannot be created")


def test_leaderboard_attack_stage_is_reused_and_tabled(world, tmp_path, capsys):
    """The leaderboard's attack stage writes W/attacks/<method>_<kind>.json, is reused on a second call with the same
    settings (not on another run step), and the board's attack table lists every method."""
    import shutil

    from sfd_jax.ddpm import leaderboard_attacks as la
    from sfd_jax.eval.classifier_train import load_classifier
    assert la.parse_attacks(" relearn,latent,relearn") == ["relearn", "latent"] and la.parse_attacks("") == []
    with pytest.raises(Exception, match="unknown attack 'amnesia'; choose from latent, relearn"):
        la.parse_attacks("latent,amnesia")
    shutil.copytree(world["attacker"], tmp_path / "classifier")
    shutil.copytree(world["judge"], tmp_path / "judge")
    first = la.attack_stage("latent", "sfd", world["one_step"], "raw", str(tmp_path), 3, fast=True, progress=False)
    assert (tmp_path / "attacks" / "sfd_latent.json").exists() and (tmp_path / "attacks" / "sfd_latent.csv").exists()
    again = la.attack_stage("latent", "sfd", world["one_step"], "raw", str(tmp_path), 3, fast=True, progress=False)
    assert "attack_latent_sfd: reusing" in capsys.readouterr().out
    assert again["rows"] == first["rows"] and again["stage_key"] == first["stage_key"]
    row = dict(first["rows"][0])
    relearn_rows = [{"k": 1, "steps_to_50_judge": None, "steps_to_50_attacker": 2, "post_judge": 0.25,
                     "steps_run": 2, "max_steps": 2}]
    board = {"kinds": ["latent", "relearn"], "settings": la.FAST_SETTINGS,
             "judge": {"arch": "resnet18", "seed": 1, "held_out_accuracy": 0.97},
             "attacker": {"arch": "cnn", "width": 32, "seed": 0},
             "rows": [{"method": m, "latent": {"rows": [row], "wall_seconds": 1.0},
                       "relearn": {"rows": relearn_rows, "wall_seconds": 2.0}} for m in ("sfd", "retrain")]}
    md = "\n".join(la.attacks_markdown(board))
    assert "| retrain |" in md and "judge k=1" in md and "| never | 2 | 25% / – |" in md
    stopped = dict(relearn_rows[0], steps_to_50_judge=1, steps_to_50_attacker=None, steps_run=1)
    assert la._attacker_steps(stopped) == "> 1" and la._attacker_steps(dict(stopped, steps_run=2)) == "never"
    both = la.recognised_by_both(str(tmp_path / "attacks" / "sfd_latent.npz"), load_classifier(world["attacker"]),
                                 load_classifier(world["judge"]), 3)
    assert set(both) == {"pre", "post"} and all(0.0 <= v <= 1.0 for v in both.values())
