"""diffusers / transformers PyTorch weights <-> our Flax parameter trees, tensor by tensor.

One rule table serves the UNet, the VAE and the CLIP text encoder. It is written in the Flax -> PyTorch
direction, which is unambiguous, and inverted against the abstract parameter tree of the target module:

- module names: ``name_N`` -> ``name.N`` (``down_blocks_0`` -> ``down_blocks.0``, ``to_out_0`` -> ``to_out.0``,
  ``net_2`` -> ``net.2``), except ``linear_1``/``linear_2`` (the time embedding's own names); CLIP's
  ``layers/0`` -> ``layers.0``; the VAE attention's ``query/key/value/proj_attn`` -> ``to_q/to_k/to_v/to_out.0``.
- leaves: ``kernel`` -> ``weight`` (Conv HWIO <-> OIHW, Dense (in, out) <-> (out, in)); ``scale`` -> ``weight``
  (GroupNorm/LayerNorm); ``embedding`` -> ``weight``; ``bias`` -> ``bias``.
- accepted on input only: transformers 4.x's ``text_model.`` prefix, the legacy VAE attention names
  (``query``/``key``/``value``/``proj_attn``) and their 1x1-conv shaped weights, ``position_ids`` buffers.

A tensor that maps to no parameter, a parameter no tensor fills, or a shape mismatch is a
:class:`WeightsMismatchError` naming the tensor.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
from flax import traverse_util

from sfd_jax.cli_utils import UsageError


class WeightsMismatchError(UsageError, ValueError):
    """The weight file does not fit the architecture its config.json describes."""


_KEEP_UNDERSCORE = {"linear_1", "linear_2"}
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_INPUT = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_SKIP_INPUT = re.compile(r"(^|\.)position_ids$")


def _module_name(name: str) -> str:
    if name in _VAE_ATTENTION:
        return _VAE_ATTENTION[name]
    if name in _KEEP_UNDERSCORE:
        return name
    m = re.fullmatch(r"(.+)_(\d+)", name)
    return f"{m.group(1)}.{m.group(2)}" if m else name


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """('down_blocks_0', 'attentions_0', 'proj_in', 'kernel') -> 'down_blocks.0.attentions.0.proj_in.weight'.

    The CLIP tree's top ``text_model`` scope is dropped (transformers 5 writes keys without it)."""
    *modules, leaf = path
    if modules and modules[0] == "text_model":
        modules = modules[1:]
    torch_leaf = "bias" if leaf == "bias" else "weight"
    return ".".join([_module_name(m) for m in modules] + [torch_leaf])


def _to_flax_array(path: tuple[str, ...], value: np.ndarray, shape: tuple[int, ...], key: str) -> np.ndarray:
    leaf = path[-1]
    if leaf == "kernel":
        if value.ndim == 4 and len(shape) == 2 and value.shape[2:] == (1, 1):  # legacy 1x1-conv attention
            value = value[:, :, 0, 0]
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
    if tuple(value.shape) != tuple(shape):
        raise WeightsMismatchError(f"tensor {key!r} has shape {tuple(value.shape)} after layout conversion, "
                                   f"expected {tuple(shape)} for {'/'.join(path)}")
    return np.ascontiguousarray(value)


def _to_torch_array(path: tuple[str, ...], value) -> np.ndarray:
    value = np.asarray(value)
    if path[-1] == "kernel":
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
    return np.ascontiguousarray(value)


def _input_aliases(key: str) -> Iterator[str]:
    """Spellings of a stored tensor name to try against our table, most specific first."""
    yield key
    if key.startswith("text_model."):
        yield key[len("text_model."):]
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY_INPUT:
        yield ".".join(parts[:-2] + [_LEGACY_INPUT[parts[-2]], parts[-1]])


def torch_index(abstract_params) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch key -> (flax path, flax shape) for every leaf of an abstract (or concrete) parameter tree."""
    flat = traverse_util.flatten_dict(_unfreeze(abstract_params))
    index = {}
    for path, leaf in flat.items():
        key = flax_path_to_torch_key(path)
        if key in index:
            raise AssertionError(f"two parameters map to {key!r}")
        index[key] = (path, tuple(leaf.shape))
    return index


def _unfreeze(tree):
    return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)


def convert_tensors(items: Iterable[tuple[str, Callable[[], np.ndarray]]], abstract_params, *, what: str,
                    dtype=np.float32, put: Callable[[np.ndarray], Any] | None = None) -> dict:
    """Fill ``abstract_params``'s tree from ``(torch_key, load_fn)`` pairs, loading one tensor at a time.

    ``put`` receives each converted numpy array (already ``dtype``) and returns what is stored (e.g. a
    ``jax.device_put``), so at most one host copy of a tensor is alive besides the result.
    """
    index = torch_index(abstract_params)
    flat: dict[tuple[str, ...], Any] = {}
    for key, load in items:
        if _SKIP_INPUT.search(key):
            continue
        target = next((index[k] for k in _input_aliases(key) if k in index), None)
        if target is None:
            raise WeightsMismatchError(f"{what}: tensor {key!r} matches no parameter of the configured model")
        path, shape = target
        if path in flat:
            raise WeightsMismatchError(f"{what}: tensor {key!r} is stored twice (under two spellings)")
        value = _to_flax_array(path, np.asarray(load()), shape, key).astype(dtype, copy=False)
        flat[path] = put(value) if put is not None else value
        del value
    missing = [k for k, (p, _) in index.items() if p not in flat]
    if missing:
        raise WeightsMismatchError(f"{what}: no tensor for {missing[0]!r} ({len(missing)} parameters missing)")
    return traverse_util.unflatten_dict(flat)


def state_dict_to_params(state_dict: Mapping[str, Any], abstract_params, *, what: str = "state dict",
                         dtype=np.float32) -> dict:
    """An in-memory torch-named state dict (numpy arrays, or torch tensors) -> our param tree."""
    def loader(v):
        def load():
            if hasattr(v, "detach"):  # a torch tensor
                return v.detach().float().cpu().numpy()
            return np.asarray(v)
        return load
    return convert_tensors(((k, loader(v)) for k, v in state_dict.items()), abstract_params, what=what, dtype=dtype)


def params_to_state_dict(params, dtype=np.float32) -> dict[str, np.ndarray]:
    """Our param tree -> a torch-named state dict of numpy arrays (diffusers' layouts)."""
    flat = traverse_util.flatten_dict(_unfreeze(params))
    return {flax_path_to_torch_key(p): _to_torch_array(p, v).astype(dtype, copy=False) for p, v in flat.items()}


# ---------------------------------------------------------------------------------------------- files
def weight_files(folder: str, stem: str, variant: str | None) -> list[str]:
    """The safetensors file(s) of a component folder (``stem`` = 'diffusion_pytorch_model' or 'model'):
    ``stem[.variant].safetensors``, or the shards listed by ``stem[.variant].safetensors.index.json``."""
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    single = os.path.join(folder, name)
    if os.path.isfile(single):
        return [single]
    index = single + ".index.json"
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    return []


def safetensors_items(files: list[str], reopen_bytes: int = 512 << 20) -> Iterator[tuple[str, Callable]]:
    """(key, load_fn) for every tensor of the files, read through ``safetensors.safe_open(framework='np')``.

    Each file is re-opened after ``reopen_bytes`` have been read, so the pages of the memory map we touched
    are dropped from the process RSS and peak host memory stays near the converted tree plus one window.
    """
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="np") as f:
            keys = list(f.keys())
        pos = 0
        while pos < len(keys):
            with safe_open(path, framework="np") as f:
                read = 0
                while pos < len(keys) and read < reopen_bytes:
                    key = keys[pos]
                    holder = {}

                    def load(f=f, key=key, holder=holder):
                        holder["v"] = f.get_tensor(key)
                        return holder["v"]
                    yield key, load
                    read += holder["v"].nbytes if "v" in holder else 0
                    holder.clear()
                    pos += 1


def load_safetensors_params(files: list[str], abstract_params, *, what: str, dtype=np.float32, put=None) -> dict:
    return convert_tensors(safetensors_items(files), abstract_params, what=what, dtype=dtype, put=put)


def save_safetensors_params(params, path: str, dtype=np.float32) -> None:
    """Our param tree -> a diffusers-named ``.safetensors`` file (metadata format 'pt', as diffusers writes)."""
    from safetensors.numpy import save_file

    save_file(params_to_state_dict(params, dtype), path, metadata={"format": "pt"})


def load_msgpack_params(path: str, abstract_params, *, what: str, dtype=np.float32, put=None) -> dict:
    """A ``flax_model.msgpack`` (``flax.serialization.to_bytes`` of the param tree, the former diffusers/
    transformers Flax format) -> our param tree, checked leaf by leaf against ``abstract_params``."""
    from flax import serialization

    with open(path, "rb") as f:
        state = serialization.msgpack_restore(f.read())
    if set(state) == {"params"}:
        state = state["params"]
    got = traverse_util.flatten_dict(state)
    want = traverse_util.flatten_dict(_unfreeze(abstract_params))
    for path_ in got:
        if path_ not in want:
            raise WeightsMismatchError(f"{what}: parameter {'/'.join(path_)!r} is not in the configured model")
    out = {}
    for path_, leaf in want.items():
        if path_ not in got:
            raise WeightsMismatchError(f"{what}: no parameter {'/'.join(path_)!r}")
        value = np.asarray(got.pop(path_))
        if tuple(value.shape) != tuple(leaf.shape):
            raise WeightsMismatchError(f"{what}: {'/'.join(path_)!r} has shape {value.shape}, expected {leaf.shape}")
        value = value.astype(dtype, copy=False)
        out[path_] = put(value) if put is not None else value
    return traverse_util.unflatten_dict(out)
