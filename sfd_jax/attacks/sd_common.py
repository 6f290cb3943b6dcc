"""What the SD attacks (:mod:`sfd_jax.attacks.sd_prompt`, :mod:`sfd_jax.attacks.sd_inversion`) share: loading the
attacked one-step generator with its pipeline, the attacker/judge pair, noise, images from token embeddings, and
the recognition rates.

Layouts: latents NHWC float32 [N, h, w, 4]; token embeddings (the text encoder's *inputs*) [P, 77, D]; text
embeddings (its outputs, the UNet's conditioning) [P, 77, D']; images NHWC float32 in [-1, 1] (uint8 for judging,
rounded as the SD demo's samples: :func:`sfd_jax.image_io.to_uint8`). Noise of image i: ``normal(fold_in(key(seed),
i), (h, w, 4))``, as :mod:`sfd_jax.sd.prompt_sampling`.

An attacked checkpoint is an SD SFD run of this project (``python -m sfd_jax.train`` with an SD recipe, e.g. the SD
demo's ``WORKDIR/forget_zero_to_one`` or ``WORKDIR/student``): its stored config names the pipeline (``sd.model``:
teacher UNet, VAE, text encoder, tokenizer, scheduler) and ``distill.init_timestep``. The concept names and caption
templates come from that pipeline's ``world.json`` (written by :func:`sfd_jax.sd.world.build_world_base` and kept by
the export), so a classifier's class index is the concept's position in ``class_names``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.cli_utils import UsageError

DEFAULT_INIT_TIMESTEP = 625


@dataclasses.dataclass
class SDTarget:
    """The attacked generator and everything around it."""
    comps: Any                     # sfd_jax.sd.pipeline.SDComponents of the pipeline (unet_params = the teacher's)
    generator_params: Any          # the attacked one-step generator's UNet parameters
    item: str                      # checkpoint item the generator came from (generator_ema / generator)
    step: int
    t_init: int
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    latent_shape: tuple[int, int, int]
    model: str                     # the pipeline folder


def resolve_target(name: str, class_names) -> int:
    """Class index of concept ``name`` (case-insensitive; a class index is accepted too)."""
    names = [str(n) for n in class_names]
    lower = [n.lower() for n in names]
    if str(name).lower() in lower:
        return lower.index(str(name).lower())
    if str(name).isdigit() and int(name) < len(names):
        return int(name)
    raise UsageError(f"--target {name!r} is not a concept of this world; expected one of {', '.join(names)}")


def load_classifier_pair(spec):
    """(attacker, judge) :class:`sfd_jax.eval.classifier_train.LoadedClassifier`, the split checked
    (:func:`sfd_jax.attacks.spec.check_judge`) before anything else is loaded."""
    from sfd_jax.attacks.spec import check_judge
    from sfd_jax.cli_utils import check_input_path
    from sfd_jax.eval.classifier_train import load_classifier
    check_input_path(spec.attacker_classifier, "--attacker_classifier")
    check_input_path(spec.judge_classifier, "--judge_classifier")
    attacker, judge = load_classifier(spec.attacker_classifier), load_classifier(spec.judge_classifier)
    check_judge(attacker, judge)
    return attacker, judge


def checkpoint_settings(checkpoint: str) -> tuple[str, int]:
    """(pipeline folder ``sd.model``, ``distill.init_timestep``) from an SD run's stored config."""
    from sfd_jax.cli_utils import check_input_path
    from sfd_jax.eval.sd_prompts import _config_value, stored_config
    check_input_path(checkpoint, "--checkpoint")
    config = stored_config(checkpoint)
    model = _config_value(config, "sd", "model")
    if not model:
        raise UsageError(f"--checkpoint {checkpoint} stores no SD training config naming its pipeline (sd.model); "
                         "attack an SD run of this project (e.g. the SD demo's WORKDIR/forget_<a>_to_<b>)")
    t_init = _config_value(config, "distill", "init_timestep")
    return str(model), DEFAULT_INIT_TIMESTEP if t_init is None else int(t_init)


def world_concepts(model: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
    """(class_names, templates, image_shape) from ``model/world.json``."""
    path = os.path.join(model, "world.json")
    if not os.path.isfile(path):
        raise UsageError(f"pipeline {model} has no world.json naming its concepts and caption templates; the SD "
                         "attacks judge images of the text-to-image world built by `demo --task=sd`")
    with open(path) as f:
        w = json.load(f)
    return tuple(w["class_names"]), tuple(w["templates"]), tuple(w["image_shape"])


def check_fits(clf, image_shape, n_classes: int, what: str) -> None:
    c = clf.config
    if (c.image_size, c.image_size, c.channels) != tuple(image_shape) or c.n_classes != n_classes:
        raise UsageError(f"{what} {clf.source} takes {c.image_size}x{c.image_size}x{c.channels} images of "
                         f"{c.n_classes} classes; this world's are {'x'.join(map(str, image_shape))}, "
                         f"{n_classes} concepts")


def weights_items(weights: str) -> tuple[str, ...]:
    from sfd_jax.convert.sd_checkpoints import GENERATOR_ITEMS
    if weights in ("auto", "ema"):
        return GENERATOR_ITEMS
    if weights == "raw":
        return ("generator",)
    raise UsageError(f"--weights must be auto, ema or raw, got {weights!r}")


def load_sd_target(checkpoint: str, weights: str = "auto", *, model: str | None = None,
                   t_init: int | None = None) -> SDTarget:
    """The generator of ``checkpoint`` (preferred item per ``weights``) and its pipeline's components."""
    from sfd_jax.convert.sd_checkpoints import restore_generator
    from sfd_jax.sd.pipeline import abstract_params, load_components
    stored_model, stored_t = checkpoint_settings(checkpoint)
    model = model or stored_model
    t_init = stored_t if t_init is None else int(t_init)
    names, templates, shape = world_concepts(model)
    comps = load_components(model)
    item, step, params = restore_generator(checkpoint, abstract_params(comps.unet), prefer=weights_items(weights))
    f = 2 ** (len(comps.vae.block_out_channels) - 1)
    latent = (int(shape[0]) // f, int(shape[1]) // f, int(comps.unet.in_channels))
    return SDTarget(comps, params, item, int(step), t_init, names, templates, latent, model)


# --------------------------------------------------------------------------------------------- arrays
def draw_noise(seed: int, n: int, latent_shape) -> np.ndarray:
    """float32 [n, h, w, c]: image i's N(0, 1) latent noise ``normal(fold_in(key(seed), i))``."""
    key = jax.random.key(int(seed))
    draw = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(latent_shape),
                                                        jnp.float32)))
    return np.asarray(draw(jnp.arange(n)))


def padded(n: int, mesh) -> int:
    """``n`` rounded up to a multiple of the mesh's batch shards."""
    from sfd_jax import parallel
    d = parallel.batch_divisor(mesh)
    return -(-n // d) * d


def pad_rows(a: np.ndarray, m: int) -> np.ndarray:
    """``a`` with its last row repeated up to ``m`` rows."""
    a = np.asarray(a)
    return a if len(a) >= m else np.concatenate([a, np.repeat(a[-1:], m - len(a), 0)])


def word_mask(ids: np.ndarray, tokenizer) -> np.ndarray:
    """float32 [P, L, 1]: 1 at the tokens of each prompt's words (after the start token, before the first
    end-of-text token), 0 at the start, end and padding tokens."""
    ids = np.asarray(ids)
    eos = int(tokenizer.eos_token_id)
    first_eos = np.argmax(ids == eos, axis=1)
    pos = np.arange(ids.shape[1])[None]
    return ((pos >= 1) & (pos < first_eos[:, None])).astype(np.float32)[..., None]


def generator_images(target: SDTarget, params: dict, ids, token_embeds, z) -> jax.Array:
    """One-step generator images [N, H, W, C] (float32, clipped to [-1, 1]) of prompts given as token
    embeddings ``token_embeds`` [N, 77, D] (``ids`` [N, 77] for the end-of-text position) and noise z [N, h, w, 4].
    ``params``: {"generator", "text_encoder", "vae"}. Differentiable in ``token_embeds``."""
    from sfd_jax.models.clip_text import text_embeddings_from_tokens
    from sfd_jax.models.vae import decode_latents
    from sfd_jax.sd.generator import generate_latents
    c = target.comps
    emb = text_embeddings_from_tokens(c.text_encoder, params["text_encoder"], ids, token_embeds)
    lat = generate_latents(c.unet, params["generator"], z, emb, np.asarray(c.schedule.alphas_cumprod, np.float32),
                           int(target.t_init), 1)
    return jnp.clip(decode_latents(c.vae, params["vae"], lat), -1.0, 1.0)


def teacher_images(target: SDTarget, params: dict, ids, token_embeds, z, *, steps: int,
                   guidance: float) -> jax.Array:
    """The teacher's DDIM (``steps``, guidance ``uncond + w·(cond − uncond)``, uncond = "") images [N, H, W, C]
    float32 in [-1, 1] from token embeddings, as :class:`sfd_jax.sd.prompt_sampling.TeacherSampler` samples.
    ``params``: {"teacher", "text_encoder", "vae", "empty_ids" (the "" prompt's ids [1, 77])}."""
    from sfd_jax.models.clip_text import text_embeddings, text_embeddings_from_tokens
    from sfd_jax.models.vae import decode_latents
    from sfd_jax.sd.generator import cfg_guided_eps
    from sfd_jax.sd.scheduler import ddim_sample
    c = target.comps
    te_p = params["text_encoder"]
    cond = text_embeddings_from_tokens(c.text_encoder, te_p, ids, token_embeds)
    uncond = jnp.broadcast_to(text_embeddings(c.text_encoder, te_p, params["empty_ids"]), cond.shape)
    lat = ddim_sample(lambda x, t: cfg_guided_eps(c.unet, params["teacher"], x, t, cond, uncond, guidance), z,
                      c.schedule, int(steps))
    return jnp.clip(decode_latents(c.vae, params["vae"], lat), -1.0, 1.0)


class Scorer:
    """The attacker and the judge, each as one compiled predictor (fixed batches of ``batch``, the last padded),
    scoring uint8 images [N, H, W, C] as the SD demo does (:func:`sfd_jax.eval.classifier_train.to_model_input`)."""

    def __init__(self, attacker, judge, *, batch: int = 128, mesh=None):
        from sfd_jax import parallel
        from sfd_jax.eval.classifier_train import make_predict_fn
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.batch = padded(batch, self.mesh)
        self.clfs = {"attacker": attacker, "judge": judge}
        self.fns = {k: make_predict_fn(c.config, self.mesh)[0] for k, c in self.clfs.items()}
        self.vars = {k: jax.device_put(c.variables, parallel.replicated(self.mesh)) for k, c in self.clfs.items()}

    def predictions(self, name: str, images_uint8: np.ndarray) -> np.ndarray:
        from sfd_jax.eval.classifier_train import to_model_input
        out = []
        for lo in range(0, len(images_uint8), self.batch):
            x = to_model_input(images_uint8[lo:lo + self.batch])
            k = len(x)
            x = pad_rows(x, self.batch)
            out.append(np.argmax(np.asarray(self.fns[name](self.vars[name], x)), -1)[:k])
        return np.concatenate(out) if out else np.zeros((0,), np.int64)

    def judged(self, images_uint8: np.ndarray, target: int, prefix: str) -> dict[str, float]:
        """``{prefix_attacker, prefix_judge}``: the fraction of ``images_uint8`` each classifies as ``target``."""
        return {f"{prefix}_{name}": float(np.mean(self.predictions(name, images_uint8) == target))
                for name in self.clfs}
