"""Load a Stable Diffusion pipeline (diffusers layout) into our Flax modules.

    comps = load_components("path/to/stable-diffusion-v1-5", dtype=jnp.bfloat16)
    eps = comps.unet.apply({"params": comps.unet_params}, latents_nhwc, t, text_emb)

The folder (or Hub repo, fetched through ``huggingface_hub`` unless ``HF_HUB_OFFLINE`` is set, in which case only
its local cache is used) holds ``model_index.json`` and one folder per component:

- ``unet/``, ``vae/``: ``config.json`` + ``diffusion_pytorch_model[.<variant>].safetensors`` (or sharded, with
  ``.safetensors.index.json``), else ``flax_model.msgpack``, else ``diffusion_pytorch_model.bin`` (read by our
  safe ``.pth`` reader, no code executed);
- ``text_encoder/``: ``config.json`` + ``model[.<variant>].safetensors`` / ``flax_model.msgpack`` / ``model.bin``;
- ``tokenizer/``: a CLIP tokenizer (``transformers.CLIPTokenizer``); ``scheduler/scheduler_config.json``.

Weights are converted one tensor at a time from safetensors' numpy reader (no torch needed) and placed on the
device as they are converted, so peak host memory stays near one copy of the weights. Parameters are float32
(``param_dtype``) whatever the file holds; ``dtype`` is the modules' compute dtype.
Config keys that our modules do not implement are an error naming the key.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.cli_utils import UsageError
from sfd_jax.convert import diffusers_weights as dw
from sfd_jax.models.clip_text import CLIPTextModel
from sfd_jax.models.sd_unet import UNet2DConditionModel
from sfd_jax.models.vae import AutoencoderKL
from sfd_jax.sd.scheduler import SDSchedule

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
            "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "scheduler": None}
_MODULES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
_WEIGHT_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


class SDLayoutError(UsageError, ValueError):
    """The path is not a (complete) diffusers Stable Diffusion folder."""


class SDComponents(NamedTuple):
    unet: UNet2DConditionModel | None
    unet_params: Any
    vae: AutoencoderKL | None
    vae_params: Any
    text_encoder: CLIPTextModel | None
    text_encoder_params: Any
    tokenizer: Any  # transformers.CLIPTokenizer
    schedule: SDSchedule | None
    scheduler_config: dict | None
    path: str  # the local folder that was read


# --------------------------------------------------------------------------------------------- locating
def read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise SDLayoutError(f"{what}: {path} is missing")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise SDLayoutError(f"{what}: {path} is not valid JSON ({e})") from None


def resolve_pretrained(path_or_repo_id: str, variant: str | None = None, revision: str | None = None) -> str:
    """A local folder as is; otherwise a Hub repo id fetched with ``huggingface_hub.snapshot_download`` (only the
    files SD needs; from the local cache only when HF_HUB_OFFLINE is set). Returns the local folder."""
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise SDLayoutError(f"{path} is a file, not a diffusers pipeline folder")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or path.startswith((".", "/")):
        raise FileNotFoundError(f"{path!r} is neither a local folder nor a Hub repo id (owner/name)")
    from huggingface_hub import constants, snapshot_download

    suffix = f".{variant}" if variant else ""
    patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*",
                f"*/diffusion_pytorch_model{suffix}.safetensors*", f"*/model{suffix}.safetensors*"]
    offline = constants.is_offline_mode()
    try:
        return snapshot_download(path, revision=revision, allow_patterns=patterns, local_files_only=offline)
    except Exception as e:  # network, auth, not found: one line for the user
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
        raise SDLayoutError(f"{path!r} is not a local folder, and fetching it from the Hub failed ({why})") from None


def read_model_index(root: str) -> dict:
    index = os.path.join(root, "model_index.json")
    if not os.path.isfile(index):
        raise SDLayoutError(f"{root} is not a diffusers pipeline folder: it has no model_index.json")
    return read_json(index, "model_index.json")


def component_dir(root: str, name: str, model_index: dict) -> str:
    """The folder of component ``name``, checked against model_index.json's class for it."""
    entry = model_index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        raise SDLayoutError(f"{root}: model_index.json lists no {name!r} component")
    allowed = _CLASSES[name]
    if allowed is not None and entry[1] not in allowed:
        raise SDLayoutError(f"{root}: component {name!r} is a {entry[1]}; sfd_jax supports {' / '.join(allowed)}")
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        raise SDLayoutError(f"{root}: component folder {name}/ is missing (model_index.json lists {entry[1]})")
    return folder


# ---------------------------------------------------------------------------------------------- loading
def abstract_params(module) -> Any:
    """The module's parameter tree as ShapeDtypeStructs (no computation)."""
    return jax.eval_shape(lambda: module.init_params(jax.random.key(0)))


def load_weights(folder: str, stem: str, abstract, *, variant: str | None = None, what: str = "",
                 param_dtype=jnp.float32, put=None) -> Any:
    """Weights of one component folder -> our param tree (see the module docstring for the file order)."""
    what = what or folder
    dtype = np.dtype(param_dtype)
    put = put if put is not None else jax.device_put
    files = dw.weight_files(folder, stem, variant)
    if files:
        return dw.load_safetensors_params(files, abstract, what=what, dtype=dtype, put=put)
    if variant:
        raise SDLayoutError(f"{what}: no {stem}.{variant}.safetensors in {folder} (variant={variant!r})")
    msgpack = os.path.join(folder, "flax_model.msgpack")
    if os.path.isfile(msgpack):
        return dw.load_msgpack_params(msgpack, abstract, what=what, dtype=dtype, put=put)
    pth = os.path.join(folder, f"{stem}.bin")
    if os.path.isfile(pth):
        from sfd_jax.convert.torch_pickle import load_torch_file

        state = load_torch_file(pth)
        return dw.convert_tensors(((k, (lambda v=v: v)) for k, v in state.items()), abstract, what=what,
                                  dtype=dtype, put=put)
    raise SDLayoutError(f"{what}: no weights in {folder} (expected {stem}.safetensors, flax_model.msgpack "
                        f"or {stem}.bin)")


def load_model(folder: str, kind: str, *, dtype=jnp.float32, variant: str | None = None,
               attention_impl: str = "xla", param_dtype=jnp.float32, put=None, **module_kwargs):
    """One model component folder (``kind`` in unet | vae | text_encoder) -> (module, params, config dict)."""
    name = os.path.basename(os.path.normpath(folder))
    config = read_json(os.path.join(folder, "config.json"), f"{name}/config.json")
    module = _MODULES[kind].from_config(config, what=f"{name}/config.json", dtype=jnp.dtype(dtype),
                                        attention_impl=attention_impl, **module_kwargs)
    params = load_weights(folder, _WEIGHT_STEM[kind], abstract_params(module), variant=variant, what=name,
                          param_dtype=param_dtype, put=put)
    return module, params, config


def load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as e:
        raise SDLayoutError(f"tokenizer: {folder} does not hold a CLIP tokenizer ({type(e).__name__}: {e})") from None


def load_components(path_or_repo_id: str, dtype=jnp.float32, variant: str | None = None, *,
                    components: tuple[str, ...] = COMPONENTS, attention_impl: str = "xla",
                    param_dtype=jnp.float32, remat: bool = False, revision: str | None = None,
                    put=None) -> SDComponents:
    """Read the SD pipeline at ``path_or_repo_id`` (see the module docstring).

    dtype: compute dtype of the modules (float32 | bfloat16 | float16); parameters are ``param_dtype``.
    variant: e.g. 'fp16' to read ``*.fp16.safetensors`` (upcast to ``param_dtype``).
    components: which of unet, vae, text_encoder, tokenizer, scheduler to load (others come back None).
    attention_impl: 'xla' | 'cudnn' | 'auto' (see :mod:`sfd_jax.models.attention`); remat: UNet rematerialisation.
    put: called on each converted numpy tensor (default ``jax.device_put``); pass e.g.
    ``lambda a: jax.device_put(a, sharding)`` to place parameters as they are read.
    """
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}; expected some of {', '.join(COMPONENTS)}")
    root = resolve_pretrained(path_or_repo_id, variant, revision)
    index = read_model_index(root)
    folders = {c: component_dir(root, c, index) for c in components}  # all layout errors before any loading
    out: dict[str, Any] = {f: None for f in SDComponents._fields}
    out["path"] = root
    common = dict(dtype=dtype, variant=variant, attention_impl=attention_impl, param_dtype=param_dtype, put=put)
    for kind in ("unet", "vae", "text_encoder"):
        if kind in folders:
            extra = {"remat": remat} if kind == "unet" else {}
            out[kind], out[f"{kind}_params"], _ = load_model(folders[kind], kind, **common, **extra)
    if "tokenizer" in folders:
        out["tokenizer"] = load_tokenizer(folders["tokenizer"])
    if "scheduler" in folders:
        config = read_json(os.path.join(folders["scheduler"], "scheduler_config.json"),
                           "scheduler/scheduler_config.json")
        out["scheduler_config"] = config
        out["schedule"] = SDSchedule.from_config(config)
    return SDComponents(**out)
