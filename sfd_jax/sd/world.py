"""A text-to-image world built here from labelled images: the components a Stable Diffusion teacher needs.

:func:`build_world_base` writes a diffusers-layout pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) for images of shape (H, W, C):

- ``vae/``: our AutoencoderKL with two levels (latents H/2 x W/2 x 4: 64 numbers for an 8x8 digit, SD's
  compression of 48 per 64 pixel values in kind), trained here on the images with the VAE objective (:func:`train_vae`:
  mean squared reconstruction error + ``kl_weight`` x the mean KL to N(0, I)); its ``scaling_factor`` is set to
  1 / std of the training latents, so the diffusion model sees unit-variance latents (SD's 0.18215 plays that
  role for SD's VAE). The held-out reconstruction error is measured and returned.
- ``text_encoder/``: a small CLIP text transformer at its random initialisation, frozen; the real CLIP BPE
  tokenizer. Whether the concept prompts stay separable through it is measured (:func:`text_separability`).
- ``unet/``: a small UNet2DConditionModel at its random initialisation (``mode='sd_pretrain'`` trains it).
- ``scheduler/``: SD 1.5's (scaled-linear β 0.00085..0.012, 1000 steps, ε-prediction).

Sizes are in :func:`world_component_configs`.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

WORLD_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77)


@dataclasses.dataclass(frozen=True)
class VAETraining:
    steps: int = 500
    batch: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-3
    seed: int = 0


def world_component_configs(image_shape, vocab: tuple[int, int, int], *, unet_channels=(32, 64),
                            vae_channels: int = 24) -> dict[str, dict]:
    """config.json dicts {'unet', 'vae', 'text_encoder'} of a world for images (H, W, C): a two-level VAE, a
    UNet with one ResNet and one cross-attention transformer per level (latents 4x4 and 2x2 for 8x8 digits),
    a 2-layer CLIP text transformer of width 64. CPU minutes, not hours."""
    h, w, c = image_shape
    levels = 2
    vae = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "act_fn": "silu", "in_channels": c,
           "out_channels": c, "latent_channels": 4, "block_out_channels": [vae_channels * 2 ** i for i in range(levels)],
           "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
           "layers_per_block": 1, "norm_num_groups": 8, "sample_size": h, "scaling_factor": 1.0,
           "mid_block_add_attention": False}
    n = len(unet_channels)
    unet = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", "sample_size": h // 2 ** (levels - 1),
            "in_channels": 4, "out_channels": 4, "block_out_channels": list(unet_channels), "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D"] * n, "up_block_types": ["CrossAttnUpBlock2D"] * n,
            "cross_attention_dim": WORLD_CLIP["hidden_size"], "attention_head_dim": 4, "norm_num_groups": 8}
    vocab_size, bos, eos = vocab
    text = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
            "vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos,
            "layer_norm_eps": 1e-5, "torch_dtype": "float32", **WORLD_CLIP}
    return {"unet": unet, "vae": vae, "text_encoder": text}


# ---------------------------------------------------------------------------------------------------- VAE
def train_vae(vae, params, images_uint8: np.ndarray, held_out_uint8: np.ndarray, s: VAETraining = VAETraining(),
              progress: bool = True):
    """Train ``vae`` (params updated from ``params``) on uint8 NHWC images; returns (params, metrics) with the
    held-out reconstruction MSE in [-1, 1] space, its PSNR (dB, on [0, 1]) and the latent std."""
    from tqdm.auto import tqdm

    from sfd_jax.data import to_model_space
    from sfd_jax.models.vae import AutoencoderKL, sample_latent

    tx = optax.adam(s.lr)
    opt = tx.init(params)

    def loss_fn(p, x, key):
        mean, logvar = vae.apply({"params": p}, x, method=AutoencoderKL.encode)
        z = sample_latent(mean, logvar, key)
        rec = vae.apply({"params": p}, z, method=AutoencoderKL.decode).astype(jnp.float32)
        kl = 0.5 * (jnp.square(mean.astype(jnp.float32)) + jnp.exp(logvar) - 1.0 - logvar)
        mse = jnp.mean(jnp.square(rec - x))
        return mse + s.kl_weight * jnp.mean(kl), mse

    @jax.jit
    def step(p, opt, x, key):
        (loss, mse), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, key)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, mse

    data = to_model_space(images_uint8)
    rng = np.random.default_rng(s.seed)
    key = jax.random.key(s.seed)
    bar = tqdm(range(s.steps), desc="vae", disable=not progress, dynamic_ncols=True)
    for i in bar:
        idx = rng.integers(0, len(data), s.batch)
        params, opt, mse = step(params, opt, jnp.asarray(data[idx]), jax.random.fold_in(key, i))
        if i % 50 == 0:
            bar.set_postfix(mse=f"{float(mse):.4f}", refresh=False)
    bar.close()
    rec, lat = reconstruct(vae, params, held_out_uint8)
    x = to_model_space(held_out_uint8)
    mse = float(np.mean((rec - x) ** 2))
    train_lat = reconstruct(vae, params, images_uint8[:2048])[1]
    return params, {"held_out_mse": mse, "held_out_psnr_db": float(10 * np.log10(4.0 / max(mse, 1e-12))),
                    "latent_std": float(train_lat.std()), "latent_mean": float(train_lat.mean()),
                    "n_train": int(len(images_uint8)), "n_held_out": int(len(held_out_uint8)),
                    "settings": dataclasses.asdict(s)}


def reconstruct(vae, params, images_uint8: np.ndarray, batch: int = 512):
    """(reconstructions float32 [-1, 1] NHWC, posterior means) of uint8 images."""
    from sfd_jax.data import to_model_space
    from sfd_jax.models.vae import AutoencoderKL

    @jax.jit
    def fn(x):
        mean, _ = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
        return vae.apply({"params": params}, mean, method=AutoencoderKL.decode).astype(jnp.float32), mean

    recs, lats = [], []
    for i in range(0, len(images_uint8), batch):
        r, m = fn(jnp.asarray(to_model_space(images_uint8[i:i + batch])))
        recs.append(np.asarray(r))
        lats.append(np.asarray(m, np.float32))
    return np.concatenate(recs), np.concatenate(lats)


# -------------------------------------------------------------------------------------------- text check
def text_separability(text_encoder, params, tokenize, class_names, templates) -> dict:
    """How well the frozen text encoder keeps the class prompts apart. Embeddings [77, D] of every
    (class, template) caption, flattened: mean cosine similarity of two captions of one class (different
    templates) and of two classes (same template), and how often the nearest class centroid (cosine, features
    centred) of the other templates' captions names the class of a caption whose template it never saw."""
    from sfd_jax.data.captions import caption
    from sfd_jax.models.clip_text import text_embeddings

    nc, nt = len(class_names), len(templates)
    caps = [caption(t, n) for n in class_names for t in templates]
    emb = np.asarray(jax.jit(lambda ids: text_embeddings(text_encoder, params, ids))(jnp.asarray(tokenize(caps))))
    e = emb.reshape(nc, nt, -1).astype(np.float64)
    u = e / np.linalg.norm(e, axis=-1, keepdims=True)
    same_class = [float(u[c, i] @ u[c, j]) for c in range(nc) for i in range(nt) for j in range(i + 1, nt)]
    same_template = [float(u[a, t] @ u[b, t]) for t in range(nt) for a in range(nc) for b in range(a + 1, nc)]
    correct = 0
    for t in range(nt):   # nearest class centroid of the other templates' captions, cosine on centred features
        rest = np.delete(e, t, axis=1)
        mu = rest.reshape(-1, e.shape[-1]).mean(0)
        cent = rest.mean(1) - mu
        cent /= np.linalg.norm(cent, axis=-1, keepdims=True)
        q = e[:, t] - mu
        q /= np.linalg.norm(q, axis=-1, keepdims=True)
        correct += int(np.sum(np.argmax(q @ cent.T, axis=1) == np.arange(nc)))
    return {"cosine_same_class_other_template": float(np.mean(same_class)) if same_class else None,
            "cosine_other_class_same_template": float(np.mean(same_template)) if same_template else None,
            "max_cosine_other_class": float(max(same_template)) if same_template else None,
            "centroid_unseen_template_accuracy": correct / (nc * nt) if nt > 1 else None,
            "n_classes": nc, "n_templates": nt}


# ------------------------------------------------------------------------------------------------- folder
def build_world_base(folder: str, data, *, seed: int = 0, vae_training: VAETraining = VAETraining(),
                     held_out=None, unet_channels=(32, 64), progress: bool = True) -> dict:
    """Write the world's base pipeline to ``folder`` (module docstring) for :class:`CaptionedImages` ``data``;
    ``held_out``: uint8 images for the reconstruction error (default: the last tenth of ``data``). Returns the
    measurements {'vae': ..., 'text': ...} (also written to ``folder/world.json``)."""
    from sfd_jax.models.clip_text import CLIPTextModel
    from sfd_jax.models.sd_unet import UNet2DConditionModel
    from sfd_jax.models.vae import AutoencoderKL
    from sfd_jax.sd.pipeline import load_tokenizer
    from sfd_jax.sd.random_pipeline import SD15_SCHEDULER, random_params, save_component, write_pipeline_skeleton
    from sfd_jax.sd.tokenizer import tokenize

    images = data.dataset.images
    if held_out is None:
        n = max(1, len(images) // 10)
        images, held_out = images[:-n], images[-n:]
    vocab = write_pipeline_skeleton(folder, dict(SD15_SCHEDULER))
    configs = world_component_configs(data.dataset.image_shape, vocab, unet_channels=unet_channels)
    tok = load_tokenizer(os.path.join(folder, "tokenizer"))

    vae = AutoencoderKL.from_config(configs["vae"])
    vae_params, vae_m = train_vae(vae, random_params(vae, seed, component="vae", std=0.0), images, held_out,
                                  vae_training, progress=progress)
    configs["vae"]["scaling_factor"] = float(1.0 / max(vae_m["latent_std"], 1e-6))
    te = CLIPTextModel.from_config(configs["text_encoder"])
    te_params = random_params(te, seed, component="text_encoder", std=0.0)
    text_m = text_separability(te, te_params, lambda caps: tokenize(tok, caps), data.class_names, data.templates)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    for name, params in (("unet", random_params(unet, seed, component="unet", std=0.0)), ("vae", vae_params),
                         ("text_encoder", te_params)):
        save_component(folder, name, configs[name], jax.device_get(params))
    report = {"vae": {**vae_m, "scaling_factor": configs["vae"]["scaling_factor"]}, "text": text_m,
              "class_names": list(data.class_names), "templates": list(data.templates),
              "image_shape": list(data.dataset.image_shape)}
    with open(os.path.join(folder, "world.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report
