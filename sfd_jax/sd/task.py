"""The host side of SD concept forgetting: config checks, prompt datasets -> step batches, the text table.

:class:`SDPrompts` turns the prompt datasets of :mod:`sfd_jax.data.prompts` into the arrays the pure step
(:mod:`sfd_jax.sd.step`) takes:

- the **text table**: every fixed string a batch can hold — row 0 is "", rows 1..n_neg the negative prompts (in
  file order, so a uniform row in that range is a uniform negative prompt), then every forget string (all
  positive-keyword variants) and override string. Their embeddings are computed once at start-up.
- per step and phase, token ids of the remain prompts [R, M, 77] and table rows of the forget / override / negative
  prompts [R, M], for this host's part of every micro-batch.

Prompt streams: 0 = remain prompts of the fake-score phase, 1 = remain prompts of the generator phase,
2 / 3 = forget prompts of the two phases; micro-batch r of step ``step`` is sampler step ``step·R + r``.

Several concepts in one run: ``prompts.forget_table`` (a CSV, :func:`sfd_jax.data.prompts.read_forget_table`)
replaces ``prompts.forget`` / ``concept_to_forget`` / ``concept_to_override`` / ``override``; its rows' pairs form
the one forget stream (:class:`~sfd_jax.data.prompts.ForgetPromptTable`) and the text table holds every concept's
forget and override strings. The step already takes a forget row and an override row per sample, so it is the same
step; a config without a table builds exactly what it built before.
"""
from __future__ import annotations

import os
import re

import numpy as np

from sfd_jax.cli_utils import UsageError

STREAMS = {"sg_remain": 0, "g_remain": 1, "sg_forget": 2, "g_forget": 3}


def validate_sd_config(config) -> None:
    """One clear line for each setting that cannot run (before anything is loaded or written)."""
    d, t, o, p = config.distill, config.training, config.optim, config.prompts
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"config.dtype must be float32, bfloat16 or float16, got {config.dtype!r}")
    if not 0 <= int(d.init_timestep) <= 999:
        raise UsageError(f"distill.init_timestep must be in [0, 999], got {d.init_timestep}")
    if not 0 <= int(d.tmin) < int(d.tmax) <= 1000:
        raise UsageError(f"distill.tmin/tmax must satisfy 0 <= tmin < tmax <= 1000, got {d.tmin}, {d.tmax}")
    for key in ("cfg_train_fake", "cfg_eval_fake", "cfg_eval_real"):
        v = float(d[key])
        if not 1.0 <= v <= 50.0:
            raise UsageError(f"distill.{key} (a guidance scale w, 1 = none) must be in [1, 50], got {v}")
    if int(d.num_steps) < 1:
        raise UsageError(f"distill.num_steps must be >= 1, got {d.num_steps}")
    if float(d.alpha) <= -1000:
        raise UsageError(f"distill.alpha must be > -1000 (the original's range), got {d.alpha}")
    if not 0.0 <= float(d.context_dropout) < 1.0:
        raise UsageError(f"distill.context_dropout must be in [0, 1), got {d.context_dropout}")
    for key in ("sg_remain_coef", "sg_forget_coef", "g_remain_coef", "g_forget_coef"):
        if float(d[key]) < 0:
            raise UsageError(f"distill.{key} must be >= 0, got {d[key]}")
    from sfd_jax.data.prompts import parse_use_neg
    try:
        parse_use_neg(d.use_neg)
    except ValueError as e:
        raise UsageError(f"distill.use_neg: {e}") from None
    if d.sid_w_neg and not p.neg:
        raise UsageError("distill.sid_w_neg needs prompts.neg (a negative prompt file)")
    if o.optimizer not in ("adam", "adamw"):
        raise UsageError(f"optim.optimizer must be adam or adamw, got {o.optimizer!r}")
    if o.precision not in ("fp32", "fp16_emulated"):
        raise UsageError(f"optim.precision must be fp32 or fp16_emulated, got {o.precision!r}")
    if float(o.lr) <= 0 or float(o.glr) <= 0:
        raise UsageError("optim.lr and optim.glr must be > 0")
    if int(t.batch) < 1 or int(t.batch_per_device) < 0:
        raise UsageError("training.batch must be >= 1 and training.batch_per_device >= 0")
    if float(t.duration_kimg) <= 0 or float(t.tick_kimg) <= 0 or int(t.snap_ticks) < 1 or int(t.dump_ticks) < 1:
        raise UsageError("training.duration_kimg and tick_kimg must be > 0, snap_ticks and dump_ticks >= 1")
    if float(t.ema_halflife_kimg) < 0:
        raise UsageError("training.ema_halflife_kimg must be >= 0 (0 = no EMA)")
    res = int(config.sd.resolution)
    if res < 1:   # the model's own multiple (VAE factor x UNet levels) is checked once it is loaded
        raise UsageError(f"sd.resolution must be a positive number of pixels, got {res}")
    if not p.remain:
        raise UsageError("prompts.remain is required: a caption file (one prompt per line) or a folder with "
                         "aesthetics_6_plus.txt (LAION-Aesthetics 6+ captions, see the README)")
    table = p.get("forget_table", "")
    if table:
        if not os.path.isfile(table):
            raise UsageError(f"prompts.forget_table {table!r}: no such file (a CSV concept,override,forget_prompts"
                             "[,override_prompts])")
    elif not p.forget and not p.concept_to_forget:
        raise UsageError("set prompts.forget (a prompt file) or prompts.concept_to_forget")
    if p.concept_to_forget:
        try:
            re.compile(p.concept_to_forget)
        except re.error as e:
            raise UsageError(f"prompts.concept_to_forget {p.concept_to_forget!r} is not a valid regex ({e})") from None


def micro_batch(config, n_batch_shards: int) -> int:
    """The global micro-batch M: ``batch_per_device`` x batch shards, or the whole batch (no accumulation)."""
    B, per = int(config.training.batch), int(config.training.batch_per_device)
    M = per * n_batch_shards if per else B
    if B % n_batch_shards:
        raise UsageError(f"training.batch={B} is not a multiple of the {n_batch_shards} batch shards of the mesh")
    if M > B or B % M:
        raise UsageError(f"training.batch={B} is not a multiple of batch_per_device x shards = {per} x "
                         f"{n_batch_shards} = {M}")
    return M


class SDPrompts:
    """Prompt datasets of a run and the text table (see the module docstring)."""

    def __init__(self, config, *, warn=print):
        from sfd_jax.data.prompts import ForgetPrompts, ForgetPromptTable, RemainPrompts
        p = config.prompts
        self.seed = int(config.seed)
        table = p.get("forget_table", "")
        shuffle_seed = None if p.shuffle_seed is None else int(p.shuffle_seed)
        try:
            self.remain = RemainPrompts.from_path(p.remain)
            if table:
                self.forget = ForgetPromptTable.build_table(
                    table, pos_path=p.pos or None, neg_path=p.neg or None, val_path=p.forget_val or None,
                    max_size=int(p.max_size), shuffle_seed=shuffle_seed)
            else:
                self.forget = ForgetPrompts.build(
                    path=p.forget or None,
                    concept_to_forget=p.concept_to_forget if p.forget else (p.concept_to_forget or None),
                    concept_to_override=p.concept_to_override, override_path=p.override or None,
                    pos_path=p.pos or None, neg_path=p.neg or None, val_path=p.forget_val or None,
                    max_size=int(p.max_size), shuffle_seed=shuffle_seed)
        except (OSError, ValueError) as e:
            raise UsageError(str(e).splitlines()[0]) from None
        if not self.forget.train_indices():
            raise UsageError("the forget prompt set has no training prompts (only validation prompts)")
        if table:
            ignored = [k for k in ("forget", "concept_to_forget", "concept_to_override", "override") if p[k]]
            if ignored:
                warn(f"note: prompts.forget_table {table} ({len(self.forget.rows)} concepts: "
                     f"{', '.join(self.forget.concepts)}) replaces prompts.{', prompts.'.join(ignored)}, "
                     "which are not used")
            unmatched = self.forget.unmatched_concept_prompts()
            what = "a forget table's concept"
        else:
            unmatched = self.forget.unmatched_concept_prompts() if p.concept_to_forget and not p.override else []
            what = f"prompts.concept_to_forget {p.concept_to_forget!r}"
        if unmatched:
            shown = "; ".join(repr(u) for u in unmatched[:5])
            warn(f"warning: {what} matches nothing in "
                 f"{len(unmatched)} forget prompt(s), whose override prompt is then the prompt itself: {shown}"
                 + (" ..." if len(unmatched) > 5 else ""))
        self.neg = list(self.forget.neg or [])
        possible = self.forget.possible_strings()
        rest = sorted((set(possible["forget"]) | set(possible["override"])) - set(self.neg) - {""})
        self.strings = [""] + self.neg + rest
        self.index: dict[str, int] = {}
        for i, s in enumerate(self.strings):
            self.index.setdefault(s, i)

    @property
    def has_neg(self) -> bool:
        return bool(self.forget.has_neg)

    def rows(self, strings) -> np.ndarray:
        return np.asarray([self.index[s] for s in strings], np.int32)

    def host_batch(self, step: int, rounds: int, micro: int, tokenize, process_index: int = 0,
                   process_count: int = 1) -> dict[str, np.ndarray]:
        """This host's part of step ``step``'s batch: ids [R, M/P, 77] and table rows [R, M/P]."""
        out: dict[str, list] = {}
        for r in range(rounds):
            k = step * rounds + r
            for phase in ("sg", "g"):
                prompts = self.remain.batch(self.seed, k, STREAMS[f"{phase}_remain"], micro, process_index,
                                            process_count)
                out.setdefault(f"{phase}_remain", []).append(tokenize(prompts))
                fb = self.forget.batch(self.seed, k, STREAMS[f"{phase}_forget"], micro, process_index, process_count)
                out.setdefault(f"{phase}_forget", []).append(self.rows(fb["forget"]))
                out.setdefault(f"{phase}_override", []).append(self.rows(fb["override"]))
                neg = fb.get("neg")
                out.setdefault(f"{phase}_neg", []).append(
                    self.rows(neg) if neg is not None else np.zeros(len(fb["forget"]), np.int32))
        return {k: np.stack(v) for k, v in out.items()}

    def grid_strings(self, n_items: int, seed: int) -> list[str]:
        """The snapshot grid's 2·n_items prompts."""
        return [it["forget"] for it in self.forget.grid_items(n_items, seed=seed)]
