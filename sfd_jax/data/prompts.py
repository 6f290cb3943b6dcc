"""Prompt datasets for Stable Diffusion concept forgetting
(README: "The original release and our differences" › SD prompts).

- :class:`RemainPrompts`: the "remain" captions (LAION-Aesthetics style), one per line.
- :class:`ForgetPrompts`: the original's ``ForgetPromptDataset``: forget prompts (file or ``|``-separated concept),
  override prompts (regex replacement of the concept, or an override file crossed with the forget prompts),
  optional pos keywords, neg prompts and val prompts.
- :class:`ForgetPromptTable`: several concepts forgotten in one run, each toward its own override, from a forget
  table (:func:`read_forget_table`: a CSV ``concept,override,forget_prompts[,override_prompts]``); one forget prompt
  stream whose every sample carries its own concept's override prompt.
- :func:`read_prompt_file`, :func:`remain_prompt_path`, :func:`parse_use_neg`.

Sampler contract (both classes; pure functions of their arguments, no hidden RNG state)
---------------------------------------------------------------------------------------
Let N be the number of items a batch draws from (train items; val items are excluded unless asked for) and B the
global batch size. Global sample ``j`` (0 <= j < B) of stream ``stream`` at iteration ``step`` is position
``p = step*B + j`` of an infinite sequence of epoch permutations: epoch ``e = p // N`` is
``np.random.default_rng([seed, stream, e]).permutation(N)`` and the sample is item ``perm[p % N]``. So every N
consecutive global samples of one stream cover each item exactly once (per aligned epoch), and different ``stream``
values (e.g. 0 = fake-score phase, 1 = generator phase) are independent.

Host ``process_index`` of ``process_count`` draws the contiguous slice
``[process_index*B/P, (process_index+1)*B/P)`` of the global batch (B must be divisible by P). Per-sample
randomness (pos keyword and placement, neg choice) uses ``np.random.default_rng([seed, stream, step, j, 7])`` with
the *global* j, so it does not depend on the process count. Hence the hosts' slices concatenate to the
single-process batch, and a resumed run (same seed and step) gets the same prompts. (The original drew keywords
from the DataLoader worker's global numpy RNG, not controlled by ``--seed``, and its InfiniteSampler is
rank-strided; we do not reproduce those streams.)

Deliberate differences from the original
----------------------------------------
- A trailing CR is stripped together with the newline (the original kept it).
- Blank lines: kept in remain files (as the original), but an error in forget/override/pos/neg/val files (the
  original would silently train on an empty prompt). A ``|``-concept with an empty entry is an error too.
- Missing override concept (``concept_to_override`` None and no override file) is a ValueError at build time
  (the original failed later on an assert). An override file works without ``concept_to_override``.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
from functools import lru_cache
from typing import Sequence

import numpy as np

REMAIN_FILE_NAMES = ("aesthetics_6_plus.txt", "aesthetics_625_plus.txt", "aesthetics_65_plus.txt")
PER_SAMPLE_TAG = 7   # last element of the per-sample seed [seed, stream, step, j, 7]
GRID_MAX_SIZE = 8    # the snapshot grid's dataset uses max_size=8


# ----------------------------------------------------------------------------------------------------------------
# Files

def read_prompt_file(path: str, what: str, allow_blank: bool = False, rstrip: bool = False) -> list[str]:
    """One prompt per line. Strips the line end ('\\n', and a '\\r' before it; the original kept the CR);
    with ``rstrip`` all trailing whitespace (the original's forget-side files are read with ``rstrip()``).

    Raises FileNotFoundError (missing file), ValueError if no line holds a non-blank prompt, and, unless
    ``allow_blank`` (remain files), ValueError naming the first blank line.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path!r}")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":        # the final newline does not start another line
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if rstrip:
        lines = [line.rstrip() for line in lines]
    if not any(line.strip() for line in lines):
        raise ValueError(f"{what} file {path} is empty")
    if not allow_blank:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                raise ValueError(f"{what} file {path} has a blank line at line {n}")
    return lines


def remain_prompt_path(path: str) -> str:
    """``path`` itself if it is a file, else the first existing of :data:`REMAIN_FILE_NAMES` in directory ``path``."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in REMAIN_FILE_NAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"remain prompt directory {path} holds none of {', '.join(REMAIN_FILE_NAMES)}")
    raise FileNotFoundError(f"remain prompt file or directory not found: {path!r}")


def parse_use_neg(value) -> tuple[bool, bool, bool]:
    """``"0,0,1"`` / ``"1,1,1"`` / a 3-sequence of 0/1 or bools -> (fake-score training, fake-score eval in the
    G loss, teacher eval in the G loss)."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        parts = list(parts)
    except TypeError:
        parts = None
    flags = []
    for v in parts or []:
        if isinstance(v, str) and v.strip() in ("0", "1"):
            flags.append(v.strip() == "1")
        elif isinstance(v, (bool, int, np.integer, np.bool_)) and int(v) in (0, 1):
            flags.append(bool(v))
        else:
            break
    if parts is None or len(parts) != 3 or len(flags) != 3:
        raise ValueError(f"use_neg must be three 0/1 flags like '0,0,1', got {value!r}")
    return tuple(flags)


# ----------------------------------------------------------------------------------------------------------------
# Sampler

@lru_cache(maxsize=64)
def _epoch_permutation(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


def _check_nonneg(**kw) -> None:
    for name, v in kw.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def sample_positions(seed: int, step: int, stream: int, batch_size: int, n: int, process_index: int = 0,
                     process_count: int = 1) -> list[tuple[int, int]]:
    """This host's ``(j, item index)`` pairs for a global batch (see the module docstring)."""
    _check_nonneg(seed=seed, step=step, stream=stream, process_index=process_index)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(process_count, (int, np.integer)) or process_count < 1 or process_index >= process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
    if n < 1:
        raise ValueError("no items to sample from")
    per = batch_size // process_count
    out = []
    for j in range(process_index * per, (process_index + 1) * per):
        p = int(step) * int(batch_size) + j
        out.append((j, int(_epoch_permutation(int(seed), int(stream), p // n, n)[p % n])))
    return out


def sample_rng(seed: int, stream: int, step: int, j: int) -> np.random.Generator:
    """The per-sample generator of global sample ``j``: ``default_rng([seed, stream, step, j, 7])``."""
    return np.random.default_rng([int(seed), int(stream), int(step), int(j), PER_SAMPLE_TAG])


# ----------------------------------------------------------------------------------------------------------------
# Remain prompts

class RemainPrompts:
    """Remain captions; ``batch`` follows the module's sampler contract (no per-sample randomness)."""

    def __init__(self, prompts: Sequence[str]):
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("remain prompts are empty")

    @classmethod
    def from_path(cls, path: str) -> "RemainPrompts":
        """A file, or a directory holding one of :data:`REMAIN_FILE_NAMES`; blank lines are kept (original)."""
        return cls(read_prompt_file(remain_prompt_path(path), "remain prompt", allow_blank=True))

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, seed: int, step: int, stream: int, batch_size: int, process_index: int = 0,
              process_count: int = 1) -> list[str]:
        pos = sample_positions(seed, step, stream, batch_size, len(self.prompts), process_index, process_count)
        return [self.prompts[i] for _, i in pos]


# ----------------------------------------------------------------------------------------------------------------
# Forget prompts

def _none_if_empty(path):
    return None if path == "" else path


class ForgetPrompts:
    """The original's ForgetPromptDataset (README: "The original release and our differences" › SD prompts).
    Build with :meth:`build`."""

    def __init__(self, pairs, is_val, pos, neg, *, forget_source, from_file, override_file_prompts, concept_to_forget,
                 concept_to_override, val_prompts):
        self.pairs: list[tuple[str, str]] = list(pairs)
        self.is_val: list[bool] = list(is_val)
        self.pos: list[str] | None = pos
        self.neg: list[str] | None = neg
        self._forget_source = forget_source          # file lines (untruncated) or concept parts (untiled)
        self._from_file = from_file
        self._override_file_prompts = override_file_prompts
        self._concept_to_forget = concept_to_forget
        self._concept_to_override = concept_to_override
        self._val_prompts = list(val_prompts)

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, path: str | None = None, concept_to_forget: str | None = None,
              concept_to_override: str | None = None, override_path: str | None = None, pos_path: str | None = None,
              neg_path: str | None = None, val_path: str | None = None, max_size: int = 10000,
              shuffle_seed: int | None = 0) -> "ForgetPrompts":
        """Forget prompts from ``path`` (truncated to ``max_size``, not tiled; "" is a missing file) or, if
        ``path`` is None, from ``concept_to_forget`` split on '|' and cycled to ``max_size`` entries.

        Overrides: the ``override_path`` lines crossed with the forget prompts (forget-major), else
        ``re.sub(concept_to_forget, concept_to_override, prompt, flags=re.IGNORECASE)`` zipped. Val lines are
        appended as ``(p, p)`` flagged val. Then pairs and flags are permuted together by
        ``np.random.RandomState(shuffle_seed).permutation(len(pairs))`` (the same order that
        ``RandomState(shuffle_seed).shuffle`` gives a list; skipped when ``shuffle_seed`` is None).
        Empty-string override/pos/neg/val paths mean None.
        """
        override_path, pos_path, neg_path, val_path = map(_none_if_empty, (override_path, pos_path, neg_path,
                                                                            val_path))
        if not isinstance(max_size, (int, np.integer)) or max_size < 1:
            raise ValueError(f"max_size must be a positive int, got {max_size!r}")
        if path is not None:
            source = read_prompt_file(path, "forget prompt", rstrip=True)
            from_file = True
        elif concept_to_forget is not None:
            source = concept_to_forget.split("|")
            if any(not s.strip() for s in source):
                raise ValueError(f"concept_to_forget {concept_to_forget!r} has an empty entry; pass a forget "
                                 f"prompt file or a non-empty concept")
            from_file = False
        else:
            raise ValueError("a forget prompt file or concept_to_forget is required")
        override_file_prompts = None
        if override_path is not None:
            override_file_prompts = read_prompt_file(override_path, "override prompt", rstrip=True)
        elif concept_to_override is None:
            raise ValueError("concept_to_override or override file required")
        elif concept_to_forget is None:
            raise ValueError("concept_to_forget is required to derive override prompts by regex "
                             "(or pass an override file)")
        else:
            try:
                re.compile(concept_to_forget)
            except re.error as e:
                raise ValueError(f"concept_to_forget {concept_to_forget!r} is not a valid regex: {e}") from None
        pos = read_prompt_file(pos_path, "pos keyword", rstrip=True) if pos_path is not None else None
        neg = read_prompt_file(neg_path, "neg prompt", rstrip=True) if neg_path is not None else None
        val = read_prompt_file(val_path, "val prompt", rstrip=True) if val_path is not None else []

        ds = cls([], [], pos, neg, forget_source=source, from_file=from_file,
                 override_file_prompts=override_file_prompts, concept_to_forget=concept_to_forget,
                 concept_to_override=concept_to_override, val_prompts=val)
        pairs, is_val = ds._pairs(max_size, with_val=True)
        if shuffle_seed is not None:
            perm = np.random.RandomState(shuffle_seed).permutation(len(pairs))
            pairs, is_val = [pairs[i] for i in perm], [is_val[i] for i in perm]
        ds.pairs, ds.is_val = pairs, is_val
        return ds

    def _forget_prompts(self, max_size: int) -> list[str]:
        src = self._forget_source
        if self._from_file:
            return src[:max_size]
        return [src[i % len(src)] for i in range(max_size)]

    def _pairs(self, max_size: int, with_val: bool) -> tuple[list[tuple[str, str]], list[bool]]:
        forget = self._forget_prompts(max_size)
        if self._override_file_prompts is not None:
            pairs = [(f, o) for f in forget for o in self._override_file_prompts]
        else:
            pairs = [(f, re.sub(self._concept_to_forget, self._concept_to_override, f, flags=re.IGNORECASE))
                     for f in forget]
        is_val = [False] * len(pairs)
        if with_val:
            pairs += [(p, p) for p in self._val_prompts]
            is_val += [True] * len(self._val_prompts)
        return pairs, is_val

    # -- queries -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def has_neg(self) -> bool:
        return self.neg is not None

    def train_indices(self) -> list[int]:
        return [i for i, v in enumerate(self.is_val) if not v]

    def val_prompts(self) -> list[str]:
        return [p for (p, _), v in zip(self.pairs, self.is_val) if v]

    def unmatched_concept_prompts(self) -> list[str]:
        """Distinct forget prompts in which the concept regex matches nothing (so the override equals the prompt).
        Empty when overrides come from a file or the concept is ""."""
        if self._override_file_prompts is not None or not self._concept_to_forget:
            return []
        pattern = re.compile(self._concept_to_forget, flags=re.IGNORECASE)
        seen = dict.fromkeys(f for (f, _), v in zip(self.pairs, self.is_val) if not v and not pattern.search(f))
        return list(seen)

    # -- sampling ----------------------------------------------------------------------------------------------
    def item(self, i: int, rng: np.random.Generator) -> dict:
        """Pair ``i`` with the original's augmentation. Draw order (non-val items only): if pos, keyword
        ``pos[rng.integers(len(pos))]`` then ``rng.random() < 0.5`` -> ``f"{k} {prompt}"`` else
        ``f"{prompt}, {k}"``; then if neg, ``neg[rng.integers(len(neg))]`` (else None)."""
        forget, override = self.pairs[i]
        neg = None
        if not self.is_val[i]:
            if self.pos:
                k = self.pos[int(rng.integers(len(self.pos)))]
                forget = f"{k} {forget}" if rng.random() < 0.5 else f"{forget}, {k}"
            if self.neg:
                neg = self.neg[int(rng.integers(len(self.neg)))]
        return {"forget": forget, "override": override, "neg": neg}

    def batch(self, seed: int, step: int, stream: int, batch_size: int, process_index: int = 0,
              process_count: int = 1, include_val: bool = False) -> dict:
        """This host's slice of the global batch (module docstring) over the train items (all items with
        ``include_val``; val items then get neg None). ``neg`` is None without a neg file."""
        indices = list(range(len(self.pairs))) if include_val else self.train_indices()
        items = [self.item(indices[k], sample_rng(seed, stream, step, j))
                 for j, k in sample_positions(seed, step, stream, batch_size, len(indices), process_index,
                                              process_count)]
        return {"forget": [it["forget"] for it in items], "override": [it["override"] for it in items],
                "neg": [it["neg"] for it in items] if self.has_neg else None}

    def possible_strings(self) -> dict:
        """Every string any batch (with or without val) or grid can contain, sorted: ``forget`` (each non-val
        prompt in both placements with every keyword when pos exists, else raw; val prompts raw), ``override``,
        ``neg`` ([] without a neg file)."""
        forget, override = set(), set()
        for (f, o), v in zip(self.pairs, self.is_val):
            override.add(o)
            if self.pos and not v:
                forget.update(s for k in self.pos for s in (f"{k} {f}", f"{f}, {k}"))
            else:
                forget.add(f)
        return {"forget": sorted(forget), "override": sorted(override), "neg": sorted(set(self.neg or []))}

    def grid_items(self, n_items: int = 16, seed: int = 0) -> list[dict]:
        """Snapshot-grid contexts, as the original's: the dataset rebuilt with max_size=8 and no shuffle (first 8 forget
        prompts' pairs, then all val pairs), neg dropped, pos kept. Items are taken in order, cycling, ``n_items``
        of them; each is fetched twice in a row with one ``np.random.default_rng(seed)`` drawing the pos keywords
        for every fetch in turn. Returns ``2*n_items`` dicts (forget, override, neg=None, is_val)."""
        pairs, is_val = self._pairs(GRID_MAX_SIZE, with_val=True)
        grid = ForgetPrompts(pairs, is_val, self.pos, None, forget_source=self._forget_source,
                             from_file=self._from_file, override_file_prompts=self._override_file_prompts,
                             concept_to_forget=self._concept_to_forget,
                             concept_to_override=self._concept_to_override, val_prompts=self._val_prompts)
        return _grid_items(grid, n_items, seed)


def _grid_items(grid: "ForgetPrompts", n_items: int, seed: int) -> list[dict]:
    """``n_items`` items of ``grid`` in order, cycling, each fetched twice with one ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    out = []
    for n in range(n_items):
        i = n % len(grid.pairs)
        for _ in range(2):
            out.append(dict(grid.item(i, rng), is_val=grid.is_val[i]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Forget table: several concepts in one run

FORGET_TABLE_COLUMNS = ("concept", "override", "forget_prompts", "override_prompts")


@dataclasses.dataclass(frozen=True)
class ForgetTableRow:
    """One concept of a forget table: ``concept`` (a case-insensitive regex, as ``prompts.concept_to_forget``),
    ``override`` (its replacement, as ``prompts.concept_to_override``; may be "" with an override file), the forget
    prompt file and the optional override prompt file (absolute paths; None: overrides by regex)."""
    concept: str
    override: str
    forget_prompts: str
    override_prompts: str | None


def read_forget_table(path: str) -> list[ForgetTableRow]:
    """The rows of a forget table: a CSV whose header is ``concept,override,forget_prompts[,override_prompts]``,
    one concept per row, prompt-file paths relative to the CSV's folder (blank lines skipped). One-line errors:
    FileNotFoundError for a missing table, ValueError for a bad header, a row of the wrong width, an empty concept
    or forget-prompt cell, no rows, or a concept listed twice (compared case-insensitively)."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"forget table file not found: {path!r}")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    if not rows:
        raise ValueError(f"forget table {path} is empty (expected the header {','.join(FORGET_TABLE_COLUMNS)} and "
                         "one row per concept)")
    header = tuple(c.strip() for c in rows[0])
    if header not in (FORGET_TABLE_COLUMNS, FORGET_TABLE_COLUMNS[:3]):
        raise ValueError(f"forget table {path}: the header must be {','.join(FORGET_TABLE_COLUMNS)} (the last column "
                         f"optional), got {','.join(header)}")
    if len(rows) == 1:
        raise ValueError(f"forget table {path} lists no concepts (only its header)")
    folder = os.path.dirname(os.path.abspath(path))
    out, seen = [], {}
    for line, row in enumerate(rows[1:], 2):
        if len(row) > len(header) or len(row) < 3:
            raise ValueError(f"forget table {path}, row {line}: {len(row)} cells, expected {len(header)} "
                             f"({','.join(header)})")
        cells = [c.strip() for c in row] + [""] * (len(header) - len(row))
        concept, override, forget_file = cells[:3]
        override_file = cells[3] if len(cells) > 3 else ""
        if not concept:
            raise ValueError(f"forget table {path}, row {line}: the concept is empty")
        if not forget_file:
            raise ValueError(f"forget table {path}, row {line} ({concept!r}): forget_prompts (a prompt file) is empty")
        if not override and not override_file:
            raise ValueError(f"forget table {path}, row {line} ({concept!r}): give an override or an "
                             "override_prompts file")
        key = concept.lower()
        if key in seen:
            raise ValueError(f"forget table {path} lists concept {concept!r} twice (rows {seen[key]} and {line})")
        seen[key] = line
        out.append(ForgetTableRow(concept, override, os.path.join(folder, forget_file),
                                  os.path.join(folder, override_file) if override_file else None))
    return out


class ForgetPromptTable(ForgetPrompts):
    """Several concepts' forget prompts as one stream (build with :meth:`build_table`).

    Each row's pairs are built as :meth:`ForgetPrompts.build` builds a single concept's (its forget file, not
    tiled; overrides by the row's regex or crossed with its override file), then all rows' pairs and the val
    pairs are shuffled together once (``RandomState(shuffle_seed)``), so a batch draws uniformly over all pairs:
    each concept in proportion to its number of pairs. Every sample's override is its own concept's.
    ``concept_of[i]`` is the row index of pair i (-1 for val pairs); pos keywords and negatives apply to every row."""

    def __init__(self, pairs, is_val, pos, neg, *, rows, row_sets, concept_of, val_prompts):
        super().__init__(pairs, is_val, pos, neg, forget_source=None, from_file=True, override_file_prompts=None,
                         concept_to_forget=None, concept_to_override=None, val_prompts=val_prompts)
        self.rows: list[ForgetTableRow] = list(rows)
        self.row_sets: list[ForgetPrompts] = list(row_sets)   # each row's own (unshuffled) dataset
        self.concept_of: list[int] = list(concept_of)

    @classmethod
    def build_table(cls, table_path: str, pos_path: str | None = None, neg_path: str | None = None,
                    val_path: str | None = None, max_size: int = 10000,
                    shuffle_seed: int | None = 0) -> "ForgetPromptTable":
        """The table at ``table_path`` (:func:`read_forget_table`); errors name the table and the row."""
        pos_path, neg_path, val_path = map(_none_if_empty, (pos_path, neg_path, val_path))
        rows = read_forget_table(table_path)
        row_sets, pairs, concept_of = [], [], []
        for i, row in enumerate(rows):
            try:
                ds = ForgetPrompts.build(path=row.forget_prompts, concept_to_forget=row.concept,
                                         concept_to_override=row.override or None,
                                         override_path=row.override_prompts, max_size=max_size, shuffle_seed=None)
            except (OSError, ValueError) as e:
                raise type(e)(f"forget table {table_path}, concept {row.concept!r}: {str(e).splitlines()[0]}") \
                    from None
            row_sets.append(ds)
            pairs += ds.pairs
            concept_of += [i] * len(ds.pairs)
        pos = read_prompt_file(pos_path, "pos keyword", rstrip=True) if pos_path is not None else None
        neg = read_prompt_file(neg_path, "neg prompt", rstrip=True) if neg_path is not None else None
        val = read_prompt_file(val_path, "val prompt", rstrip=True) if val_path is not None else []
        is_val = [False] * len(pairs) + [True] * len(val)
        pairs += [(p, p) for p in val]
        concept_of += [-1] * len(val)
        if shuffle_seed is not None:
            perm = np.random.RandomState(shuffle_seed).permutation(len(pairs))
            pairs, is_val, concept_of = ([x[i] for i in perm] for x in (pairs, is_val, concept_of))
        return cls(pairs, is_val, pos, neg, rows=rows, row_sets=row_sets, concept_of=concept_of, val_prompts=val)

    @property
    def concepts(self) -> list[str]:
        return [r.concept for r in self.rows]

    def batch(self, seed: int, step: int, stream: int, batch_size: int, process_index: int = 0,
              process_count: int = 1, include_val: bool = False) -> dict:
        """As :meth:`ForgetPrompts.batch`, plus ``concept``: each sample's row index (-1: a val prompt)."""
        out = super().batch(seed, step, stream, batch_size, process_index, process_count, include_val)
        indices = list(range(len(self.pairs))) if include_val else self.train_indices()
        out["concept"] = [self.concept_of[indices[k]] for _, k in
                          sample_positions(seed, step, stream, batch_size, len(indices), process_index,
                                           process_count)]
        return out

    def unmatched_concept_prompts(self) -> list[str]:
        """Every row's forget prompts in which its concept regex matches nothing (rows with an override file
        excepted)."""
        return [p for ds in self.row_sets for p in ds.unmatched_concept_prompts()]

    def grid_items(self, n_items: int = 16, seed: int = 0) -> list[dict]:
        """As :meth:`ForgetPrompts.grid_items`, with the rows' first 8 forget prompts' pairs taken in turn (row 0's
        first, row 1's first, ..., row 0's second, ...), then the val pairs."""
        per_row = [ds._pairs(GRID_MAX_SIZE, with_val=False)[0] for ds in self.row_sets]
        pairs = [row[i] for i in range(max(len(r) for r in per_row)) for row in per_row if i < len(row)]
        pairs += [(p, p) for p in self._val_prompts]
        is_val = [False] * (len(pairs) - len(self._val_prompts)) + [True] * len(self._val_prompts)
        grid = ForgetPrompts(pairs, is_val, self.pos, None, forget_source=None, from_file=True,
                             override_file_prompts=None, concept_to_forget=None, concept_to_override=None,
                             val_prompts=self._val_prompts)
        return _grid_items(grid, n_items, seed)
