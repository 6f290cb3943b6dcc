"""Original DDPM ``.pth`` checkpoints <-> :class:`~sfd_jax.models.ddpm_unet.ConditionalUNet` parameters.

File formats (README: "The original release and our differences" › DDPM distillation): a pickled Python list
  pretrained  ``[model_sd, optimizer_sd, step, ema_sd]`` (3 entries when EMA was off),
  distilled   ``[fake_score_sd, fake_score_opt, generator_sd, generator_opt, step, generator_ema_sd]``
with ``None`` in place of absent entries (early-stage snapshots). A bare state dict is read as a model.
Reading never imports torch and never runs code from the file (:mod:`sfd_jax.convert.torch_pickle`).

Layouts: conv OIHW <-> HWIO, Linear (out, in) <-> kernel (in, out), GroupNorm weight <-> scale, Embedding
weight <-> embedding. Module names: ``down.1.block.0`` <-> ``down_1_block_0``, ``mid.attn_1`` <-> ``mid_attn_1``,
``temb.dense.0`` <-> ``temb_dense_0``.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any, Mapping

import jax
import numpy as np

from sfd_jax.convert.torch_pickle import load_torch_file, save_torch_file

PRETRAINED_KEYS = ("model", "ema")
DISTILLED_KEYS = ("fake_score", "generator", "generator_ema")

_TORCH_TO_FLAX = [
    (re.compile(r"^(down|up)\.(\d+)\.(block|attn)\.(\d+)$"), r"\1_\2_\3_\4"),
    (re.compile(r"^(down|up)\.(\d+)\.(downsample|upsample)$"), r"\1_\2_\3"),
    (re.compile(r"^mid\.(block_1|block_2|attn_1)$"), r"mid_\1"),
    (re.compile(r"^(temb|cemb)\.dense\.(\d+)$"), r"\1_dense_\2"),
]
_FLAX_TO_TORCH = [
    (re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$"), r"\1.\2.\3.\4"),
    (re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$"), r"\1.\2.\3"),
    (re.compile(r"^mid_(block_1|block_2|attn_1)$"), r"mid.\1"),
    (re.compile(r"^(temb|cemb)_dense_(\d+)$"), r"\1.dense.\2"),
]


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameters do not fit the configured architecture."""


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


def torch_key_to_flax_path(key: str, ndim: int) -> tuple[str, ...]:
    """``'down.1.block.0.conv1.weight'`` (a 4-d tensor) -> ``('down_1_block_0', 'conv1', 'kernel')``."""
    if key == "null_classes_emb":
        return (key,)
    parts = key.split(".")
    module, leaf = ".".join(parts[:-1]), parts[-1]
    # The top-level block is everything but the innermost submodule, except for single-level modules.
    if module in ("conv_in", "conv_out", "norm_out", "classes_emb") or re.match(r"^(temb|cemb)\.dense\.\d+$", module):
        outer, inner = _rename(module, _TORCH_TO_FLAX), None
    else:
        outer, inner = _rename(".".join(parts[:-2]), _TORCH_TO_FLAX), parts[-2]
    if leaf == "bias":
        fleaf = "bias"
    elif leaf == "weight":
        fleaf = "embedding" if module == "classes_emb" else ("scale" if ndim == 1 else "kernel")
    else:
        raise CheckpointMismatchError(f"unexpected parameter name {key!r} in checkpoint")
    return (outer, fleaf) if inner is None else (outer, inner, fleaf)


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of :func:`torch_key_to_flax_path`."""
    if path == ("null_classes_emb",):
        return path[0]
    *modules, leaf = path
    tleaf = "bias" if leaf == "bias" else "weight"
    return ".".join([_rename(modules[0], _FLAX_TO_TORCH), *modules[1:], tleaf])


def _to_flax_array(key: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if value.ndim == 4:   # conv OIHW -> HWIO
        value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2 and not key.startswith("classes_emb"):  # Linear (out, in) -> (in, out)
        value = value.T
    return np.ascontiguousarray(value)


def _to_torch_array(path: tuple[str, ...], value) -> np.ndarray:
    value = np.asarray(value)
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2 and path[-1] == "kernel":
        value = value.T
    return np.ascontiguousarray(value)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def state_dict_to_params(state_dict: Mapping[str, Any]) -> dict:
    """Torch state dict (numpy values, optional ``module.`` prefixes) -> nested Flax param dict (float32)."""
    params: dict = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key == "logvar":  # only model.type == 'bayesian' has it; never used by any code path
            continue
        if type(key) is not str or not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub":
            raise CheckpointMismatchError(f"state dict entry {key!r} is a {type(value).__name__}"
                                          f"{' of ' + str(value.dtype) if isinstance(value, np.ndarray) else ''}, "
                                          "not a numeric tensor")
        try:
            path = torch_key_to_flax_path(key, value.ndim)
        except (IndexError, KeyError, ValueError) as e:
            if isinstance(e, CheckpointMismatchError):
                raise
            raise CheckpointMismatchError(f"unexpected parameter name {key!r} in checkpoint") from None
        _set(params, path, _to_flax_array(key, value).astype(np.float32))
    return params


def params_to_state_dict(params) -> "OrderedDict[str, np.ndarray]":
    """Nested Flax params -> torch-layout state dict of numpy arrays (names and order as the original)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    items = []
    for kp, value in flat:
        path = tuple(k.key for k in kp)
        items.append((flax_path_to_torch_key(path), _to_torch_array(path, np.asarray(value))))
    return OrderedDict(sorted(items, key=lambda kv: original_order(kv[0])))


_TOP_ORDER = ("logvar", "null_classes_emb", "temb", "classes_emb", "cemb", "conv_in", "down", "mid", "up",
              "norm_out", "conv_out")
_PART_ORDER = {name: i for i, name in enumerate((
    "block", "attn", "downsample", "upsample", "block_1", "attn_1", "block_2", "dense", "norm1", "conv1",
    "temb_cemb_proj", "norm2", "conv2", "nin_shortcut", "norm", "q", "k", "v", "proj_out", "conv", "weight",
    "bias"))}


def original_order(key: str):
    """Sort key giving the original's ``named_parameters`` order of torch parameter names."""
    top, *rest = key.split(".")
    return (_TOP_ORDER.index(top) if top in _TOP_ORDER else len(_TOP_ORDER),
            [(0, int(p), "") if p.isdigit() else (1, _PART_ORDER.get(p, 99), p) for p in rest])


def check_params(params, expected, what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming the first parameter whose presence or shape differs.

    ``expected`` is a pytree of arrays or ShapeDtypeStructs for the configured model (e.g. from jax.eval_shape).
    Names in messages are the original torch names.
    """
    def flat(tree):
        return {flax_path_to_torch_key(tuple(k.key for k in kp)): tuple(np.shape(v))
                for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    got, want = flat(params), flat(expected)
    for name in sorted(set(got) | set(want), key=original_order):
        if name not in want:
            raise CheckpointMismatchError(
                f"{what} has parameter {name!r} {got[name]} that the config's model lacks (wrong --config?)")
        if name not in got:
            raise CheckpointMismatchError(f"{what} lacks parameter {name!r} {want[name]} that the config expects")
        if want[name] != got[name]:
            raise CheckpointMismatchError(f"{what} parameter {name!r} has shape {got[name]} but the config "
                                          f"expects {want[name]} (wrong --config?)")


def read_seed_ddpm_checkpoint(path: str | os.PathLike) -> tuple[str, int | None, dict]:
    """(kind, step, nets) with kind 'pretrained' | 'distilled' and nets as :func:`load_seed_ddpm_checkpoint`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    obj = load_torch_file(path)
    if isinstance(obj, Mapping):
        obj = [obj]
    if not isinstance(obj, (list, tuple)) or not obj:
        raise CheckpointMismatchError(
            f"{path}: expected a list [model, opt, step, ema] or [sg, sg_opt, g, g_opt, step, ema], "
            f"got {type(obj).__name__}")

    def conv(sd):
        if sd is None:
            return None
        if not isinstance(sd, Mapping):
            raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(sd).__name__}")
        try:
            return state_dict_to_params(sd)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"{path}: {e}") from None

    n = len(obj)
    if n <= 4:   # [model, opt, step, ema] / [model, opt, step] / [model]
        step = obj[2] if n >= 3 else None
        ema = obj[3] if n == 4 else None
        return "pretrained", _as_step(step), {"model": conv(obj[0]), "ema": conv(ema)}
    if n == 6:
        return "distilled", _as_step(obj[4]), {"fake_score": conv(obj[0]), "generator": conv(obj[2]),
                                               "generator_ema": conv(obj[5])}
    raise CheckpointMismatchError(f"{path}: a list of {n} entries is neither a pretrained (3-4) nor a distilled "
                                  "(6) checkpoint")


def _as_step(step) -> int | None:
    if step is None:
        return None
    return int(np.asarray(step))


def load_seed_ddpm_checkpoint(path: str | os.PathLike) -> dict:
    """Read an original DDPM ``.pth`` without torch and without running code from it.

    Returns ``{'model', 'ema'}`` for a pretrained file or ``{'fake_score', 'generator', 'generator_ema'}`` for a
    distilled one; each a Flax param tree for :class:`ConditionalUNet`, or None where the file has no such entry.
    """
    return read_seed_ddpm_checkpoint(path)[2]


def _empty_adam_state(n_params: int, lr: float, beta1: float) -> dict:
    """A torch.optim.Adam state_dict with no moments yet: the original's resume loads it as a fresh Adam."""
    return {"state": {}, "param_groups": [dict(
        lr=lr, betas=(beta1, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, maximize=False, foreach=None,
        capturable=False, differentiable=False, fused=None, params=list(range(n_params)))]}


def save_seed_ddpm_checkpoint(path: str | os.PathLike, *, model=None, ema=None, fake_score=None, generator=None,
                              generator_ema=None, step: int = 0) -> None:
    """Write a ``.pth`` the original code loads (needs torch).

    With ``model`` (and optionally ``ema``): the pretrained list ``[model, adam, step, ema]`` (3 entries without
    ema); the optimizer entry is an empty Adam state, so the original's resume starts fresh moments.
    With ``fake_score``/``generator``/``generator_ema``: the distilled 6-list, optimizer entries None (as the
    original's early-stage snapshots), absent networks None.
    """
    distilled = any(v is not None for v in (fake_score, generator, generator_ema))
    if distilled == (model is not None or ema is not None):
        raise ValueError("pass either model/ema (pretrained) or fake_score/generator/generator_ema (distilled)")
    sd = lambda p: None if p is None else params_to_state_dict(p)  # noqa: E731
    if distilled:
        obj = [sd(fake_score), None, sd(generator), None, int(step), sd(generator_ema)]
    else:
        if model is None:
            raise ValueError("a pretrained checkpoint needs `model`")
        msd = sd(model)
        obj = [msd, _empty_adam_state(len(msd), 2e-4, 0.9), int(step)]
        if ema is not None:
            obj.append(sd(ema))
    save_torch_file(obj, path)
