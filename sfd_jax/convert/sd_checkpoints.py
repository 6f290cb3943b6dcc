"""Stable Diffusion UNets between our Orbax checkpoints and diffusers folders (and SiD-LSG's pickles).

- :func:`export_diffusers`: our checkpoint's generator -> a complete diffusers pipeline folder (the UNet as
  ``unet/diffusion_pytorch_model.safetensors`` + ``config.json``; every other component copied from the base
  pipeline), loadable by ``diffusers.StableDiffusionPipeline.from_pretrained`` and by
  :func:`sfd_jax.sd.pipeline.load_components`.
- :func:`import_diffusers_unet`: any diffusers UNet folder (or a pipeline's ``unet/``) -> our checkpoint.
- :func:`import_sid_lsg`: the SiD-LSG generator pickle (``batch512_cfg4.54.54.5_t625_8380_v2.pkl``, whose
  ``"ema"`` entry is a pickled diffusers UNet module) -> our checkpoint. The pickle is read without running code
  from it (module classes become inert stubs, tensors are rebuilt through the torch allowlist): no torch, no
  diffusers, no ``--trust-pickle`` needed.

Our checkpoint for an SD UNet: item ``generator`` (the param tree), no ConfigDict, and ``meta`` holding
``unet_config`` (the diffusers config dict, so the module can be rebuilt), ``source`` and ``format``.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from sfd_jax.cli_utils import UsageError
from sfd_jax.convert import diffusers_weights as dw

GENERATOR_ITEMS = ("generator_ema", "generator", "ema", "model")  # preferred first; a pretrained UNet: EMA


def _unet_folder(src: str) -> str:
    """A UNet folder, or a pipeline folder's ``unet/``."""
    if os.path.isfile(os.path.join(src, "model_index.json")):
        from sfd_jax.sd.pipeline import component_dir, read_model_index

        return component_dir(src, "unet", read_model_index(src))
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise UsageError(f"{src} is neither a diffusers pipeline folder (model_index.json) nor a UNet folder "
                         "(config.json)")
    return src


def _fresh_checkpoint_dir(out: str) -> str:
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise UsageError(f"{ckpt_dir} already holds checkpoints; choose an empty --out")
    return ckpt_dir


def save_unet_checkpoint(out: str, params, unet_config: dict, *, source: str, fmt: str, item: str = "generator",
                         step: int = 0) -> str:
    """Write ``params`` as item ``item`` of a new checkpoint under ``out``; returns the step directory."""
    from sfd_jax.checkpoint import Checkpointer

    ckpt_dir = _fresh_checkpoint_dir(out)
    ckpt = Checkpointer(ckpt_dir)
    meta = {"source": source, "format": fmt, "unet_config": dict(unet_config), "step": step}
    ckpt.save(step, {item: params}, meta=json.loads(json.dumps(meta, default=list)))
    ckpt.wait()
    ckpt.close()
    return os.path.join(ckpt_dir, str(step))


def import_diffusers_unet(src: str, out: str, *, variant: str | None = None, item: str = "generator") -> str:
    """diffusers UNet folder (or pipeline folder) -> our checkpoint under ``out``; returns the step directory."""
    from sfd_jax.sd.pipeline import load_model

    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src!r} is not a folder")
    folder = _unet_folder(src)
    _fresh_checkpoint_dir(out)
    _, params, config = load_model(folder, "unet", variant=variant, put=np.asarray)
    return save_unet_checkpoint(out, params, config, source=os.path.abspath(folder), fmt="diffusers_unet",
                                item=item)


def restore_generator(checkpoint: str, abstract, prefer: tuple[str, ...] = GENERATOR_ITEMS):
    """(item name, step, params) of the first item of ``prefer`` the checkpoint holds (default: the EMA
    generator, else the raw one), checked against ``abstract``'s shapes and restored onto one device."""
    from sfd_jax.checkpoint import Checkpointer, abstract_like, resolve_checkpoint_dir

    directory, step = resolve_checkpoint_dir(checkpoint)
    ckpt = Checkpointer(directory)
    step = ckpt.checked_step(step)
    items = ckpt.items(step)
    name = next((n for n in prefer if n in items), None)
    if name is None:
        raise UsageError(f"checkpoint {directory / str(step)} has no generator item "
                         f"(expected {' or '.join(prefer)}; it holds {', '.join(items)})")
    saved = jax.tree_util.tree_flatten_with_path(ckpt.item_shapes(name, step))[0]
    want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    got = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in saved}
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise dw.WeightsMismatchError(
                f"checkpoint item {name!r} does not fit the base UNet config: {key} is "
                f"{got.get(key, 'absent')} in the checkpoint, {want.get(key, 'absent')} in the base")
    target = abstract_like(abstract, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return name, step, ckpt.restore({name: target}, step)[name]


def export_diffusers(checkpoint: str, base: str, out: str) -> str:
    """Our checkpoint's generator (EMA if present) + the base pipeline's other components -> ``out``."""
    from sfd_jax.models.sd_unet import UNet2DConditionModel
    from sfd_jax.sd.pipeline import abstract_params, component_dir, read_model_index

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"--out {out} exists and is not an empty folder")
    if not os.path.isdir(base):
        raise FileNotFoundError(f"--base {base!r} is not a folder")
    index = read_model_index(base)
    base_unet = component_dir(base, "unet", index)
    with open(os.path.join(base_unet, "config.json")) as f:
        unet_config = json.load(f)
    module = UNet2DConditionModel.from_config(unet_config)
    name, step, params = restore_generator(checkpoint, abstract_params(module))

    tmp = out.rstrip("/") + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    shutil.copytree(base, tmp, ignore=lambda d, names: ["unet"] if os.path.samefile(d, base) else [])
    os.makedirs(os.path.join(tmp, "unet"))
    with open(os.path.join(tmp, "unet", "config.json"), "w") as f:
        json.dump(unet_config, f, indent=2, sort_keys=True)
    dw.save_safetensors_params(jax.device_get(params), os.path.join(tmp, "unet", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(tmp, "sfd_jax_export.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(checkpoint), "item": name, "step": step,
                   "base": os.path.abspath(base)}, f, indent=2)
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------ SiD-LSG pickles
# Classes in these namespaces (the UNet's diffusers and torch.nn modules, EDM/SiD's training classes, torch
# dtypes/devices) become inert stubs; any other global is refused.
_STUB_NAMESPACES = ("diffusers.", "torch.nn.", "torch_utils.", "training.", "dnnlib.")
_STUB_TORCH_NAMES = frozenset({"device", "Size", "float32", "float16", "bfloat16", "float64", "int64", "int32",
                               "uint8", "bool"})


class _Stub:
    """An object of a class named in the pickle. The class is never imported and nothing of it runs: the stub only
    keeps what the pickle hands it (constructor args, BUILD state, SETITEMS items, APPENDS items)."""

    stub_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__.update(stub_args=args, stub_state=None, stub_items={}, stub_list=[])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["stub_state"] = state

    def __setitem__(self, key, value):
        self.stub_items[key] = value

    def append(self, value):
        self.stub_list.append(value)

    def extend(self, values):
        self.stub_list.extend(values)

    def __repr__(self):
        return f"<stub {self.stub_name}>"


def _stub_factory():
    classes: dict[tuple[str, str], type] = {}

    def fallback(module: str, name: str):
        if not (module.startswith(_STUB_NAMESPACES) or (module == "torch" and name in _STUB_TORCH_NAMES)):
            return None
        if not name.isidentifier():
            return None
        key = (module, name)
        if key not in classes:
            classes[key] = type(name, (_Stub,), {"stub_name": f"{module}.{name}", "__slots__": ()})
        return classes[key]
    return fallback


def read_sid_lsg_pickle(src: str) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict of numpy arrays, UNet config) of a SiD-LSG pickle's ``"ema"`` UNet, without running code from
    the file: a plain pickle (``pickle.dump``; storages as ``torch.storage._load_from_bytes`` of legacy
    ``torch.save`` bytes) or a ``torch.save`` zip. Module classes become :class:`_Stub`; tensors are rebuilt by
    :mod:`sfd_jax.convert.torch_pickle`'s allowlist; the parameters and persistent buffers come from walking the
    modules' ``_parameters``/``_buffers``/``_modules`` and the config from the UNet's ``_internal_dict``."""
    import zipfile

    from sfd_jax.convert import torch_pickle as tp

    display = os.path.basename(src)
    fallback = _stub_factory()
    if zipfile.is_zipfile(src):
        data = tp.load_torch_file(src, fallback=fallback)
    else:
        def load_from_bytes(blob):
            if type(blob) is not bytes:
                raise tp.CheckpointFormatError(f"{display}: malformed storage record (_load_from_bytes of "
                                               f"{type(blob).__name__})")
            storage = tp.load_legacy_torch(blob, f"{display} (a storage)")
            if not isinstance(storage, tp._Storage):
                raise tp.CheckpointFormatError(f"{display}: a storage record holds {type(storage).__name__}")
            return storage

        allowed = dict(tp._ALLOWED)
        allowed[("torch.storage", "_load_from_bytes")] = tp._Callable("torch.storage._load_from_bytes",
                                                                      load_from_bytes)
        with open(src, "rb") as f:
            try:
                data = tp._SafeUnpickler(f, display, allowed=allowed, fallback=fallback).load()
            except (tp.UnsafeCheckpointError, tp.CheckpointFormatError):
                raise
            except tp._BadRecord as e:
                raise tp.CheckpointFormatError(f"{display}: {e}") from None
            except tp._CORRUPT as e:
                raise tp.CheckpointFormatError(f"{display}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "ema" not in data:
        keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"{src} has no 'ema' entry (it holds {keys})")
    ema = data["ema"]
    state = ema.stub_state if isinstance(ema, _Stub) else None
    if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict) \
            or not isinstance(state.get("_internal_dict"), _Stub):
        raise UsageError(f"{src}: 'ema' is a {getattr(ema, 'stub_name', type(ema).__name__)}, not a diffusers "
                         "UNet module")
    tensors: dict[str, np.ndarray] = {}
    _collect_tensors(ema, "", tensors, src, depth=0)
    cfg = state["_internal_dict"]
    config = dict(cfg.stub_items) or (dict(cfg.stub_state) if isinstance(cfg.stub_state, dict) else {})
    return tensors, config


def _collect_tensors(module, prefix: str, out: dict, src: str, depth: int) -> None:
    state = module.stub_state if isinstance(module, _Stub) else None
    if not isinstance(state, dict) or depth > 100:
        raise UsageError(f"{src}: 'ema' module {prefix.rstrip('.') or '(root)'} is a "
                         f"{getattr(module, 'stub_name', type(module).__name__)}, not a torch module")
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        entries = state.get(group) or {}
        if not isinstance(entries, dict):
            raise UsageError(f"{src}: 'ema' module {prefix.rstrip('.') or '(root)'} has a malformed {group}")
        for name, value in entries.items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, np.ndarray):
                raise UsageError(f"{src}: 'ema' tensor {prefix}{name} is a {type(value).__name__}, not a tensor")
            out[f"{prefix}{name}"] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out, src, depth + 1)


def import_sid_lsg(src: str, out: str, *, trust_pickle: bool = False, base: str | None = None) -> str:
    """SiD-LSG generator pickle -> our checkpoint (item ``generator``) under ``out``; returns the step dir.

    Reads the pickle with :func:`read_sid_lsg_pickle` (no code from the file runs; needs neither torch nor
    diffusers). ``trust_pickle`` is accepted for compatibility and no longer needed."""
    del trust_pickle
    if not os.path.isfile(src):
        raise FileNotFoundError(f"--src {src!r} does not exist")
    _fresh_checkpoint_dir(out)
    state_dict, unet_config = read_sid_lsg_pickle(src)
    if base is not None:
        from sfd_jax.sd.pipeline import component_dir, read_model_index

        with open(os.path.join(component_dir(base, "unet", read_model_index(base)), "config.json")) as f:
            unet_config = json.load(f)
    from sfd_jax.models.sd_unet import UNet2DConditionModel
    from sfd_jax.sd.pipeline import abstract_params

    abstract = abstract_params(UNet2DConditionModel.from_config(unet_config, what=f"{src} ['ema'].config"))
    params = dw.state_dict_to_params(state_dict, abstract, what=f"{src} ['ema']")
    return save_unet_checkpoint(out, params, unet_config, source=os.path.abspath(src), fmt="sid_lsg_pickle")
