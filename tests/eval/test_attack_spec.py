"""The attacker/judge split: the same classifier (path or parameters) or the same architecture and seed is refused."""
from __future__ import annotations

import json

import jax
import pytest

from sfd_jax.attacks.spec import AttackResult, AttackSpec, check_judge, describe
from sfd_jax.cli_utils import UsageError
from sfd_jax.eval.classifier_train import LoadedClassifier
from sfd_jax.models.classifier import ClassifierConfig, init_variables


def _clf(path, arch="cnn", seed=0, init_seed=None):
    cfg = ClassifierConfig(arch=arch, n_classes=10, image_size=8, channels=1, width=8)
    v = init_variables(cfg, jax.random.key(seed if init_seed is None else init_seed))
    return LoadedClassifier(cfg, v, {"train_config": {"seed": seed}}, str(path))


def test_judge_must_not_be_the_attacker(tmp_path):
    a = _clf(tmp_path / "a")
    with pytest.raises(UsageError, match="same path"):
        check_judge(a, _clf(tmp_path / "a", arch="resnet18", seed=1))
    with pytest.raises(UsageError, match="same parameters"):
        check_judge(a, _clf(tmp_path / "copy_of_a"))
    with pytest.raises(UsageError, match="architecture .* and seed"):
        check_judge(a, _clf(tmp_path / "b", init_seed=5))          # other weights, same arch and seed
    check_judge(a, _clf(tmp_path / "b", seed=1))                    # another seed: accepted
    check_judge(a, _clf(tmp_path / "c", arch="resnet18", seed=0))   # another architecture: accepted


def test_result_writes_json_and_csv(tmp_path):
    spec = AttackSpec(kind="latent", checkpoint="ck", target="3", attacker_classifier="a", judge_classifier="b",
                      out=str(tmp_path / "r" / "latent"))
    a, b = _clf(tmp_path / "a"), _clf(tmp_path / "b", seed=1)
    res = AttackResult(spec, [{"pre_judge": 0.0, "post_judge": 0.5, "pre_attacker": 0.0, "post_attacker": 0.9}],
                       describe(a), describe(b), 1.234)
    js, cs = res.write()
    d = json.load(open(js))
    assert d["rows"][0]["post_judge"] == 0.5 and d["attacker"]["fingerprint"] != d["judge"]["fingerprint"]
    lines = open(cs).read().splitlines()
    assert lines[0] == "kind,checkpoint,target,pre_judge,post_judge,pre_attacker,post_attacker"
    assert lines[1].startswith("latent,ck,3,0.0,0.5")
