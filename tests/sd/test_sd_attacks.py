"""The SD attacks on a tiny random pipeline: the text encoder's embedding path equals its token-id path, the prompt
attack raises its objective within its budget, Concept Inversion lowers its loss and trains v* only, and a judge
that is the attacker is refused before anything is loaded."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.attacks import sd_common
from sfd_jax.attacks.spec import AttackSpec, fingerprint
from sfd_jax.cli_utils import UsageError
from sfd_jax.eval.classifier_train import LoadedClassifier, save_classifier
from sfd_jax.models.classifier import ClassifierConfig, init_variables

NAMES = ("zero", "one", "two")
TEMPLATES = ("a photo of a {name}", "a {name}")


def _clf(seed: int, path: str = "mem") -> LoadedClassifier:
    cfg = ClassifierConfig(arch="cnn", n_classes=len(NAMES), image_size=16, channels=3, width=4)
    return LoadedClassifier(cfg, init_variables(cfg, jax.random.key(seed)), {"train_config": {"seed": seed}},
                            f"{path}{seed}")


@pytest.fixture(scope="module")
def target():
    from sfd_jax.sd.random_pipeline import random_components
    one_level = {"block_out_channels": (16,), "down_block_types": ("CrossAttnDownBlock2D",),
                 "up_block_types": ("CrossAttnUpBlock2D",)}   # fewer ops to compile than the two-level tiny UNet
    comps = random_components("tiny", seed=0, tokenizer=True, unet_overrides=one_level)
    gen = jax.tree_util.tree_map(lambda a: a * 1.01, comps.unet_params)   # a "generator" other than the teacher
    return sd_common.SDTarget(comps, gen, "generator", 0, 625, NAMES, TEMPLATES, (8, 8, 4), "")


def test_text_encoder_embedding_path_equals_id_path(target):
    from sfd_jax.models.clip_text import text_embeddings, text_embeddings_from_tokens, token_embedding_table
    from sfd_jax.sd.tokenizer import tokenize
    c = target.comps
    ids = tokenize(c.tokenizer, ["a photo of a zero", "a two"])
    table = token_embedding_table(c.text_encoder_params)
    a = text_embeddings(c.text_encoder, c.text_encoder_params, ids)
    b = text_embeddings_from_tokens(c.text_encoder, c.text_encoder_params, ids, table[ids])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bump = 0.05 * jax.random.normal(jax.random.key(0), table[ids].shape)   # (a constant shift: the layer norms drop it)
    moved = text_embeddings_from_tokens(c.text_encoder, c.text_encoder_params, ids, table[ids] + bump)
    assert float(jnp.max(jnp.abs(moved - a))) > 1e-2   # the embeddings do reach the output


def test_prompt_attack_raises_objective_within_budget(target):
    from sfd_jax.attacks.sd_prompt import prompt_attack
    rows, extra, images = prompt_attack(target, _clf(0), _clf(1), 0, budgets=(0.0, 0.05), n=4, steps=3, lr=0.02,
                                        progress=False)
    still, moved = rows
    assert still["delta_norm_max"] == 0.0 and still["objective_post"] == still["objective_pre"]
    np.testing.assert_array_equal(images["post_0"], images["pre"])          # budget 0: the unattacked images
    assert moved["objective_post"] > moved["objective_pre"]
    assert 0.0 < moved["delta_norm_max"] <= 0.05 + 1e-6
    assert extra["tokens_attacked"] == 5 + 2 and images["post_1"].shape == (4, 16, 16, 3)   # words of both prompts
    for key in ("pre_judge", "post_judge", "pre_attacker", "post_attacker", "post_fresh_judge"):
        assert 0.0 <= moved[key] <= 1.0


def test_concept_inversion_lowers_its_loss_and_trains_only_v(target):
    from sfd_jax.attacks.sd_inversion import inversion_attack
    c = target.comps
    before = [fingerprint(p) for p in (c.unet_params, target.generator_params, c.text_encoder_params, c.vae_params)]
    rows, extra, images = inversion_attack(target, _clf(0), _clf(1), 0, ks=(2,), n=2, steps=8, lr=0.02, batch=4,
                                           teacher_steps=2, progress=False)
    row = rows[0]
    assert row["loss_end"] < row["loss_start"]
    after = [fingerprint(p) for p in (c.unet_params, target.generator_params, c.text_encoder_params, c.vae_params)]
    assert after == before                                          # networks and the vocabulary untouched
    assert not np.allclose(images["v_2"] / np.sqrt(extra["embedding_dim"]), 0) and \
        abs(row["v_norm"] - extra["v_init_norm"]) > 1e-6             # v* moved away from its start
    assert images["train"].shape == (2, 16, 16, 3) and images["post_2"].shape == (2, 16, 16, 3)
    assert extra["prompts"] == ["a photo of a *", "a *"]


def test_judge_that_is_the_attacker_is_refused_first(tmp_path):
    from sfd_jax.attacks import sd_inversion, sd_prompt
    clf = _clf(0)
    path = save_classifier(tmp_path / "clf", clf.variables, clf.config, {"train_config": {"seed": 0}})
    for kind, mod in (("prompt", sd_prompt), ("inversion", sd_inversion)):
        spec = AttackSpec(kind=kind, checkpoint=str(tmp_path / "no_such_run"), target="zero",
                          attacker_classifier=path, judge_classifier=path, out=str(tmp_path / kind))
        with pytest.raises(UsageError, match="judge classifier is the attacker"):
            mod.run(spec, progress=False)
    assert not (tmp_path / "prompt.json").exists()


def test_sd_demo_attack_kinds_and_summary_table():
    from sfd_jax.sd.demo_attacks import attacks_markdown, parse_kinds, summary_rows
    assert parse_kinds("prompt,inversion,prompt") == ("prompt", "inversion")
    with pytest.raises(UsageError, match="inversion, prompt"):
        parse_kinds("latent")
    clf = {"arch": "resnet18", "seed": 1, "held_out_accuracy": 0.97}
    common = {"pre_judge": 0.0, "pre_attacker": 0.0, "post_attacker": 0.9, "seconds": 1.0}
    results = {("prompt", "forget"): {"spec": {"target": "zero"}, "wall_seconds": 3.0, "rows": [
                   {"budget": 0.04, "post_judge": 0.6, "post_fresh_judge": 0.5, **common}]},
               ("inversion", "student"): {"spec": {"target": "zero"}, "wall_seconds": 4.0, "rows": [
                   {"k": 8, "post_judge": 0.7, "teacher_post_judge": 1.0, **common}]}}
    rows = summary_rows(results)
    assert [(r["attack"], r["setting"], r["post_judge"], r["check"]) for r in rows] == \
        [("prompt", "budget 0.04", 0.6, 0.5), ("inversion", "k = 8", 0.7, 1.0)]
    md = attacks_markdown({"judge": clf, "rows": rows, "token_norm_rms": 0.02})
    assert "| prompt | forgetting run, forgotten concept | zero | budget 0.04 | 0.00 | **0.60** |" in md
    assert "Floor: the world's UNet at its random initialisation" in md


def test_sd_demo_refuses_a_bad_attack_kind_in_one_line(tmp_path):
    from tests.conftest import last_line, run_cli
    proc = run_cli("sfd_jax.demo", "--task=sd", f"--workdir={tmp_path / 'd'}", "--attacks=latent")
    assert proc.returncode == 2 and "--attacks with --task=sd takes inversion, prompt" in last_line(proc.stderr)
    assert not (tmp_path / "d").exists()
