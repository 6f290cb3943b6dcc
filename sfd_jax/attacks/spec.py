"""What every attack takes and returns, and the attacker/judge split.

An attack runs on one checkpoint the project trains (an SFD generator, a baseline, a teacher, an SD forgetting
run) and tries to make its samples of the forgotten ``target`` recognisable as that target again, within a stated
budget. ``pre`` / ``post``: the fraction of ``n`` samples of the target that a classifier recognises as the target
before / after the attack. Both the attacker (the classifier the attack optimises against) and the judge (an
independently trained classifier, different architecture and seed) report ``pre`` and ``post``; the judge's are the
result.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from sfd_jax.cli_utils import UsageError

KINDS = ("latent", "relearn", "inversion", "prompt")   # latent/relearn: DDPM checkpoints; inversion/prompt: SD


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack run (``evaluate attack`` flags map one-to-one onto these fields)."""
    kind: str                        # one of KINDS
    checkpoint: str                  # the attacked run's workdir or checkpoint directory
    target: str                      # the forgotten class: a class index ('3', DDPM) or a concept name ('zero', SD)
    attacker_classifier: str         # classifier checkpoint the attack maximises
    judge_classifier: str            # independently trained classifier that judges (must differ from the attacker)
    out: str                         # output prefix: OUT.json and OUT.csv
    n: int = 100                     # samples of the target attacked and judged
    steps: int = 100                 # optimisation steps (latent, inversion, prompt); max fine-tuning steps (relearn)
    lr: float = 0.05                 # attack optimiser learning rate
    budget: float = 0.5              # latent: max L2 norm of the noise change / sqrt(noise dim), per sample;
                                     # prompt: max L2 norm of the token-embedding change / sqrt(embedding dim)
    k: tuple[int, ...] = (1, 8, 32)  # relearn: real images of the target; inversion: teacher images of the concept
    eval_every: int = 10             # relearn: judge every this many fine-tuning steps
    weights: str = "auto"            # which weights of the checkpoint ('auto': its sampling weights)
    seed: int = 0
    batch: int = 32                  # relearn: fine-tuning batch (drawn with replacement from the k images)
    ddim_steps: int | None = None    # latent/relearn on a multi-step DDPM: DDIM steps (None: config sampling.grid_steps)
    cond_scale: float | None = None  # ... and guidance s (None: config sampling.grid_cond_scale)
    # SD attacks (inversion, prompt)
    teacher: str = ""                # inversion: the teacher pipeline folder ('': the checkpoint's sd.model)
    teacher_steps: int = 20          # inversion: DDIM steps of the teacher's images of the concept
    teacher_guidance: float = 3.0    # inversion: their guidance w (uncond + w·(cond − uncond))


@dataclasses.dataclass
class AttackResult:
    """``rows``: one dict per setting (e.g. per k for relearn) with at least ``pre_judge``, ``post_judge``,
    ``pre_attacker``, ``post_attacker`` (fractions in [0, 1]) and the budget actually used."""
    spec: AttackSpec
    rows: list[dict[str, Any]]
    attacker: dict[str, Any]         # path, arch, seed / parameter fingerprint
    judge: dict[str, Any]
    wall_seconds: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)   # written as OUT.npz (e.g. images)

    def to_json(self) -> dict:
        return {"spec": dataclasses.asdict(self.spec), "rows": self.rows, "attacker": self.attacker,
                "judge": self.judge, "wall_seconds": round(self.wall_seconds, 2), **self.extra}

    def write(self, out: str | None = None) -> tuple[str, str]:
        """``OUT.json`` (everything), ``OUT.csv`` (the rows) and, when there are ``arrays``, ``OUT.npz``; returns the
        JSON and CSV paths."""
        out = out or self.spec.out
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        js, cs = out + ".json", out + ".csv"
        with open(js, "w") as f:
            json.dump(self.to_json(), f, indent=2)
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        with open(cs, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["kind", "checkpoint", "target", *keys])
            w.writeheader()
            for row in self.rows:
                w.writerow({"kind": self.spec.kind, "checkpoint": self.spec.checkpoint, "target": self.spec.target,
                            **row})
        if self.arrays:
            np.savez_compressed(out + ".npz", **self.arrays)
        return js, cs


def fingerprint(variables) -> str:
    """SHA-256 (first 16 hex digits) of a classifier's parameters: equal fingerprints = the same classifier."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(variables)):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str(a.shape).encode() + str(a.dtype).encode() + a.tobytes())
    return h.hexdigest()[:16]


def check_judge(attacker, judge) -> None:
    """Refuse (one line) a judge that is the attacker: the same path, or the same parameters.

    ``attacker`` / ``judge``: :class:`sfd_jax.eval.classifier_train.LoadedClassifier`."""
    same_path = os.path.realpath(attacker.source) == os.path.realpath(judge.source)
    if same_path or fingerprint(attacker.variables) == fingerprint(judge.variables):
        raise UsageError("the judge classifier is the attacker classifier "
                         f"({'same path' if same_path else 'same parameters'}: {judge.source}); judge with an "
                         "independently trained classifier (another architecture and seed)")
    if attacker.config.arch == judge.config.arch and attacker.meta.get("train_config", {}).get("seed") == \
            judge.meta.get("train_config", {}).get("seed"):
        raise UsageError(f"the judge ({judge.source}) has the attacker's architecture ({judge.config.arch}) and seed; "
                         "judge with an independently trained classifier (another architecture and seed)")


def describe(clf) -> dict:
    """Path, architecture, seed and parameter fingerprint of a loaded classifier (for the result's JSON)."""
    return {"path": os.path.abspath(clf.source), "arch": clf.config.arch,
            "seed": clf.meta.get("train_config", {}).get("seed"), "fingerprint": fingerprint(clf.variables),
            "held_out_accuracy": clf.meta.get("held_out_accuracy")}
