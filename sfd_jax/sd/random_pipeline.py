r"""Random Stable Diffusion pipelines, without torch: for tests, demos and benchmarks when no real weights are around.

  python -m sfd_jax.sd.random_pipeline --out DIR [--size tiny|sd15] [--seed 0]

:func:`write_random_pipeline` writes a diffusers-layout folder that :func:`sfd_jax.sd.pipeline.load_components` loads and
that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads too:

- ``model_index.json`` (StableDiffusionPipeline, no safety checker / feature extractor);
- ``unet/``, ``vae/``: ``config.json`` + ``diffusion_pytorch_model.safetensors``; ``text_encoder/``: ``config.json`` +
  ``model.safetensors`` (keys with the ``text_model.`` prefix, as in the SD 1.5 repo; transformers 4 and 5 read it);
- ``tokenizer/``: the real CLIP BPE tokenizer (``sfd_jax.sd.tokenizer.write_clip_tokenizer``) when open-clip-torch's
  vocabulary is installed, else a byte-level CLIP tokenizer without merges (514 tokens: every character its own
  token), which loads and tokenizes the same way, just into more tokens;
- ``scheduler/scheduler_config.json``: SD 1.5's PNDM config.

The weights (:func:`random_params`) follow Flax's default initialisation in kind, plus N(0, 0.05^2) on every
parameter (zero biases would hide mistakes), drawn with numpy so that they are quick to make and the same on every
backend; they are written by :mod:`sfd_jax.convert.diffusers_weights` (float32).

Sizes: 'tiny' (UNet 32/64 channels, VAE 16/32 channels with downsampling factor 2, 2-layer CLIP with 32 features:
8x8 latents decode to 16x16 images) and 'sd15' (the real SD 1.5 configs: 860M + 84M + 123M parameters, 4.3 GB on
disk). :func:`random_components` builds the same in memory (an :class:`sfd_jax.sd.pipeline.SDComponents`) without writing
anything, e.g. for benchmarks at 512 px.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PERTURB_STD = 0.05
SIZES = ("tiny", "sd15")

# ------------------------------------------------------------------------------------------------ configs
# The real Stable Diffusion 1.5 component configs (as in the Hub repo's config.json files).
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

CLIP_VIT_L14_TEXT = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}

# SD 1.5's scheduler/scheduler_config.json (plus prediction_type, which diffusers defaults to epsilon)
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}

# Tiny shapes (module keyword arguments; the tests' diffusers pipelines use the same)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
TINY_VAE = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4,
                sample_size=16)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77)

_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def component_configs(size: str = "tiny", *, vocab: tuple[int, int, int] = (49408, 49406, 49407),
                      unet_overrides: dict | None = None, scheduler_overrides: dict | None = None) -> dict[str, dict]:
    """The config.json dicts {'unet', 'vae', 'text_encoder', 'scheduler'} of a random pipeline of ``size``.

    vocab: (vocab_size, bos_id, eos_id) of the tokenizer; used by the tiny text encoder (sd15 keeps its real config).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    if size == "sd15":
        unet, vae, text = dict(SD15_UNET), dict(SD_VAE), dict(CLIP_VIT_L14_TEXT)
    else:
        vocab_size, bos, eos = vocab
        unet = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", **_jsonable(TINY_UNET)}
        vae = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", **_jsonable(TINY_VAE)}
        text = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
                "vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos,
                "layer_norm_eps": 1e-5, "torch_dtype": "float32", **TINY_CLIP}
    unet.update(_jsonable(unet_overrides or {}))
    scheduler = {**SD15_SCHEDULER, **(scheduler_overrides or {})}
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


# ---------------------------------------------------------------------------------------------- tokenizer
def write_tokenizer(folder: str) -> tuple[int, int, int]:
    """A CLIP tokenizer folder: the real one if open_clip's BPE list is installed, else a byte-level vocabulary
    without merges. Returns (vocab_size, bos_id, eos_id)."""
    from sfd_jax.sd import tokenizer as sd_tokenizer

    try:
        sd_tokenizer.write_clip_tokenizer(folder)
        return 49408, 49406, 49407
    except FileNotFoundError:  # open_clip not installed: byte-level vocabulary, no merges
        chars = list(sd_tokenizer.bytes_to_unicode().values())
        vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars]
                                            + [sd_tokenizer.BOS, sd_tokenizer.EOS])}
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": sd_tokenizer.EOS,
                  "bos_token": sd_tokenizer.BOS, "eos_token": sd_tokenizer.EOS, "unk_token": sd_tokenizer.EOS}
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        return len(vocab), len(vocab) - 2, len(vocab) - 1


def _tokenizer_vocab() -> tuple[int, int, int]:
    """(vocab_size, bos, eos) that :func:`write_tokenizer` would produce here."""
    from sfd_jax.sd import tokenizer as sd_tokenizer

    try:
        sd_tokenizer.default_bpe_path()
        return 49408, 49406, 49407
    except FileNotFoundError:
        return 2 * 256 + 2, 2 * 256, 2 * 256 + 1


# ------------------------------------------------------------------------------------------------ params
_SALT = {"unet": 1, "vae": 2, "text_encoder": 3}


def _leaf_init(path: tuple[str, ...], shape: tuple[int, ...], rng: np.random.Generator, std: float) -> np.ndarray:
    """Flax's default initialisers in kind (LeCun-normal kernels, N(0, 0.02^2) embeddings as CLIP's, zero biases,
    unit norm scales), then N(0, std^2) on top."""
    leaf = path[-1]
    if leaf == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        value = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))
    elif leaf == "embedding":
        value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    elif leaf == "scale":
        value = np.ones(shape, np.float32)
    elif leaf == "bias":
        value = np.zeros(shape, np.float32)
    else:
        raise ValueError(f"no initialiser for parameter {'/'.join(path)}")
    value += rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return value


def random_params(module, seed: int, *, component: str = "", std: float = PERTURB_STD, put=None):
    """Random parameters for ``module`` (its tree from ``module.init_params`` under ``jax.eval_shape``), drawn with
    numpy (``default_rng([seed, salt(component)])``, leaves in tree order): see :func:`_leaf_init`.

    numpy rather than running ``init_params``: the first (compiling) call of a Flax init takes 20-40 s for even
    the tiny UNet on CPU, numpy takes milliseconds, and its values are the same on every backend.
    ``put`` is applied to each numpy leaf (default ``jax.device_put``; host memory then holds one leaf at a time).
    """
    from flax import traverse_util

    abstract = jax.eval_shape(lambda: module.init_params(jax.random.key(0)))
    flat = traverse_util.flatten_dict(abstract.unfreeze() if hasattr(abstract, "unfreeze") else dict(abstract))
    rng = np.random.default_rng([seed, _SALT.get(component, 0)])
    put = put or jax.device_put
    out = {path: put(_leaf_init(path, tuple(leaf.shape), rng, std)) for path, leaf in flat.items()}
    return traverse_util.unflatten_dict(out)


def _build(size: str, seed: int, dtype, components, unet_overrides, scheduler_overrides, vocab, attention_impl,
           param_dtype, put=None):
    from sfd_jax.models.clip_text import CLIPTextModel
    from sfd_jax.models.sd_unet import UNet2DConditionModel
    from sfd_jax.models.vae import AutoencoderKL

    configs = component_configs(size, vocab=vocab, unet_overrides=unet_overrides,
                                scheduler_overrides=scheduler_overrides)
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    out: dict[str, Any] = {}
    for name, cls in classes.items():
        if name not in components:
            out[name], out[f"{name}_params"] = None, None
            continue
        module = cls.from_config(configs[name], what=f"{name}/config.json", dtype=jnp.dtype(dtype),
                                 attention_impl=attention_impl)
        cast, place = np.dtype(param_dtype), put or jax.device_put
        out[name] = module
        out[f"{name}_params"] = random_params(module, seed, component=name,
                                              put=lambda a: place(a.astype(cast, copy=False)))
    return configs, out


def random_components(size: str = "tiny", seed: int = 0, dtype=jnp.float32, *,
                      components: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
                      tokenizer: bool = False, unet_overrides: dict | None = None,
                      scheduler_overrides: dict | None = None, attention_impl: str = "xla",
                      param_dtype=jnp.float32, put=None):
    """A random pipeline of ``size`` in memory, as :class:`sfd_jax.sd.pipeline.SDComponents` (``path`` is '').

    dtype: the modules' compute dtype; parameters are ``param_dtype`` (float32), the same values
    :func:`write_random_pipeline` writes for the same ``size``/``seed``/overrides (with the same tokenizer
    vocabulary). tokenizer: also build the CLIP tokenizer (written to a temporary folder and loaded with
    transformers); otherwise ``tokenizer`` is None. Nothing else touches the disk. put: called on each parameter
    (a numpy array) to place it, default ``jax.device_put`` (e.g. ``lambda a: jax.device_put(a, sharding)``).
    """
    from sfd_jax.sd.pipeline import COMPONENTS, SDComponents
    from sfd_jax.sd.scheduler import SDSchedule

    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}; expected some of {', '.join(COMPONENTS)}")
    tok = None
    vocab = _tokenizer_vocab()
    if tokenizer and "tokenizer" in components:
        from sfd_jax.sd.pipeline import load_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            vocab = write_tokenizer(tmp)
            tok = load_tokenizer(tmp)
    configs, out = _build(size, seed, dtype, components, unet_overrides, scheduler_overrides, vocab,
                          attention_impl, param_dtype, put)
    has_scheduler = "scheduler" in components
    return SDComponents(
        **out, tokenizer=tok,
        schedule=SDSchedule.from_config(configs["scheduler"]) if has_scheduler else None,
        scheduler_config=configs["scheduler"] if has_scheduler else None, path="")


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_random_pipeline(folder: str, size: str = "tiny", seed: int = 0, *, unet_overrides: dict | None = None,
                          scheduler_overrides: dict | None = None) -> str:
    """Write a random SD pipeline of ``size`` ('tiny' | 'sd15') to ``folder`` (created; files there are
    overwritten); returns ``folder``. See the module docstring for the layout. ``unet_overrides`` are merged into
    the UNet's config (e.g. ``{"use_linear_projection": True, "attention_head_dim": [2, 4]}``),
    ``scheduler_overrides`` into the scheduler's (e.g. ``{"prediction_type": "v_prediction"}``)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    folder = os.fspath(folder)
    vocab = write_pipeline_skeleton(folder, {**SD15_SCHEDULER, **(scheduler_overrides or {})})
    configs = component_configs(size, vocab=vocab, unet_overrides=unet_overrides,
                                scheduler_overrides=scheduler_overrides)
    for name in ("unet", "vae", "text_encoder"):
        # one component at a time, as numpy arrays on the host (sd15's UNet: 3.4 GB, plus its state dict)
        _, out = _build(size, seed, jnp.float32, (name,), unet_overrides, scheduler_overrides, vocab, "xla",
                        jnp.float32, put=lambda a: a)
        save_component(folder, name, configs[name], out.pop(f"{name}_params"))
        del out
    return folder


def save_component(folder: str, name: str, config: dict, params) -> None:
    """Write component ``name`` (unet | vae | text_encoder) of a pipeline folder: ``config.json`` and its
    float32 safetensors weights (the text encoder's under the SD 1.5 repo's ``text_model.`` key names)."""
    from safetensors.numpy import save_file

    from sfd_jax.convert import diffusers_weights as dw

    _write_json(os.path.join(folder, name, "config.json"), config)
    stem = "model" if name == "text_encoder" else "diffusion_pytorch_model"
    path = os.path.join(folder, name, f"{stem}.safetensors")
    if name == "text_encoder":  # transformers 4 needs the prefix; 5 accepts it
        state = {f"text_model.{k}": v for k, v in dw.params_to_state_dict(params).items()}
        save_file(state, path, metadata={"format": "pt"})
    else:
        dw.save_safetensors_params(params, path)


def write_pipeline_skeleton(folder: str, scheduler_config: dict) -> tuple[int, int, int]:
    """``model_index.json``, the scheduler config and the tokenizer of a pipeline folder; returns the tokenizer's
    (vocab_size, bos_id, eos_id)."""
    os.makedirs(folder, exist_ok=True)
    vocab = write_tokenizer(os.path.join(folder, "tokenizer"))
    _write_json(os.path.join(folder, "model_index.json"), _MODEL_INDEX)
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler_config)
    return vocab


# ------------------------------------------------------------------------------------------------ CLI
def main(argv):
    from absl import flags

    from sfd_jax.cli_utils import UsageError

    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS.out:
        raise UsageError("--out is required")
    if os.path.exists(flags.FLAGS.out) and not os.path.isdir(flags.FLAGS.out):
        raise UsageError(f"--out {flags.FLAGS.out!r} exists and is not a folder")
    folder = write_random_pipeline(flags.FLAGS.out, flags.FLAGS.size, flags.FLAGS.seed)
    print(f"wrote a random {flags.FLAGS.size} Stable Diffusion pipeline to {folder}")


def cli():
    from absl import flags

    from sfd_jax.cli_utils import run

    flags.DEFINE_string("out", None, "Output folder (diffusers layout).")
    flags.DEFINE_enum("size", "tiny", list(SIZES), "tiny: test-sized modules; sd15: the real SD 1.5 shapes (4.3 GB).")
    flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
    run(main, "sfd_jax.sd.random_pipeline")


if __name__ == "__main__":
    cli()
