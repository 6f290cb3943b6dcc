"""Stable Diffusion UNets between our Orbax checkpoints and diffusers folders (and SiD-LSG's pickles).

- :func:`export_diffusers`: our checkpoint's generator -> a complete diffusers pipeline folder (the UNet as
  ``unet/diffusion_pytorch_model.safetensors`` + ``config.json``; every other component copied from the base
  pipeline), loadable by ``diffusers.StableDiffusionPipeline.from_pretrained`` and by
  :func:`sfd_jax.sd.load_components`.
- :func:`import_diffusers_unet`: any diffusers UNet folder (or a pipeline's ``unet/``) -> our checkpoint.
- :func:`import_sid_lsg`: the SiD-LSG generator pickle (``batch512_cfg4.54.54.5_t625_8380_v2.pkl``, whose
  ``"ema"`` entry is a pickled diffusers UNet module) -> our checkpoint. Unpickling runs code from the file, so
  it needs an explicit ``trust_pickle=True``, torch and diffusers.

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

GENERATOR_ITEMS = ("generator_ema", "generator")  # preferred first when exporting


def _unet_folder(src: str) -> str:
    """A UNet folder, or a pipeline folder's ``unet/``."""
    if os.path.isfile(os.path.join(src, "model_index.json")):
        from sfd_jax.sd import component_dir, read_model_index

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
    from sfd_jax.sd import load_model

    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src!r} is not a folder")
    folder = _unet_folder(src)
    _fresh_checkpoint_dir(out)
    _, params, config = load_model(folder, "unet", variant=variant, put=np.asarray)
    return save_unet_checkpoint(out, params, config, source=os.path.abspath(folder), fmt="diffusers_unet",
                                item=item)


def _restore_generator(checkpoint: str, abstract, prefer: tuple[str, ...] = GENERATOR_ITEMS):
    """(item name, step, params) of the first item of ``prefer`` the checkpoint holds (default: the EMA
    generator, else the raw one), checked against ``abstract``'s shapes and restored onto one device."""
    from sfd_jax.checkpoint import Checkpointer, abstract_like, resolve_checkpoint_dir

    directory, step = resolve_checkpoint_dir(checkpoint)
    ckpt = Checkpointer(directory)
    step = ckpt._step(step)
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
    from sfd_jax.sd import abstract_params, component_dir, read_model_index

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"--out {out} exists and is not an empty folder")
    if not os.path.isdir(base):
        raise FileNotFoundError(f"--base {base!r} is not a folder")
    index = read_model_index(base)
    base_unet = component_dir(base, "unet", index)
    with open(os.path.join(base_unet, "config.json")) as f:
        unet_config = json.load(f)
    module = UNet2DConditionModel.from_config(unet_config)
    name, step, params = _restore_generator(checkpoint, abstract_params(module))

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


UNSAFE_PICKLE_MESSAGE = (
    "{src} is a Python pickle whose 'ema' entry is a pickled diffusers UNet module; unpickling it runs code "
    "stored in the file. Re-run with --trust-pickle only if you trust where the file comes from")


def import_sid_lsg(src: str, out: str, *, trust_pickle: bool = False, base: str | None = None) -> str:
    """SiD-LSG generator pickle -> our checkpoint (item ``generator``) under ``out``; returns the step dir."""
    if not os.path.isfile(src):
        raise FileNotFoundError(f"--src {src!r} does not exist")
    if not trust_pickle:
        raise UsageError(UNSAFE_PICKLE_MESSAGE.format(src=src))
    _fresh_checkpoint_dir(out)
    try:
        import pickle
        import zipfile

        import diffusers  # noqa: F401  (the pickle references diffusers classes)
        import torch
    except ImportError as e:
        raise UsageError(f"reading {src} needs torch and diffusers installed ({e})") from None
    if zipfile.is_zipfile(src):
        data = torch.load(src, map_location="cpu", weights_only=False)
    else:
        with open(src, "rb") as f:
            data = pickle.load(f)
    if not isinstance(data, dict) or "ema" not in data:
        keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"{src} has no 'ema' entry (it holds {keys})")
    ema = data["ema"]
    if not hasattr(ema, "state_dict") or not hasattr(ema, "config"):
        raise UsageError(f"{src}: 'ema' is a {type(ema).__name__}, not a diffusers UNet module")
    unet_config = {k: v for k, v in dict(ema.config).items()}
    if base is not None:
        from sfd_jax.sd import component_dir, read_model_index

        with open(os.path.join(component_dir(base, "unet", read_model_index(base)), "config.json")) as f:
            unet_config = json.load(f)
    from sfd_jax.models.sd_unet import UNet2DConditionModel
    from sfd_jax.sd import abstract_params

    abstract = abstract_params(UNet2DConditionModel.from_config(unet_config, what=f"{src} ['ema'].config"))
    params = dw.state_dict_to_params(ema.state_dict(), abstract, what=f"{src} ['ema']")
    return save_unet_checkpoint(out, params, unet_config, source=os.path.abspath(src), fmt="sid_lsg_pickle")
