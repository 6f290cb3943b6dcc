"""Tiny random Stable Diffusion pipelines written by diffusers/transformers ``save_pretrained`` (needs torch).

The tokenizer is the real CLIP tokenizer when open-clip-torch is installed (``pip install --no-deps
open-clip-torch``), else a byte-level CLIP tokenizer without merges (514 tokens) so the pipeline still loads
(:func:`sfd_jax.sd.random_pipeline.write_tokenizer`; the tiny shapes live in :mod:`sfd_jax.sd.random_pipeline` too).
"""
from __future__ import annotations

import os

import numpy as np

from sfd_jax.sd.random_pipeline import TINY_CLIP, TINY_VAE, write_tokenizer
from sfd_jax.sd.random_pipeline import TINY_UNET as TINY_UNET_SD1

TINY_UNET_SD2 = dict(
    TINY_UNET_SD1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
    use_linear_projection=True, upcast_attention=True)


def _perturb(module, seed: int, scale: float = 0.05):
    """Move every parameter off its init (zero-init convs/biases would hide mistakes)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def make_pipeline(folder: str, kind: str = "sd1", *, hidden_act: str = "quick_gelu", prediction_type: str = "epsilon",
                  seed: int = 0):
    """Save a tiny random StableDiffusionPipeline to ``folder``; returns the pipeline (torch, fp32, eval)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "_tok")
    vocab, bos, eos = write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unet_cfg = TINY_UNET_SD1 if kind == "sd1" else TINY_UNET_SD2
    unet = _perturb(UNet2DConditionModel(**unet_cfg), seed + 1)
    vae = _perturb(AutoencoderKL(**TINY_VAE), seed + 2)
    te = _perturb(CLIPTextModel(CLIPTextConfig(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos,
                                               pad_token_id=eos, hidden_act=hidden_act, **TINY_CLIP)), seed + 3)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    import shutil
    shutil.rmtree(tok_dir)
    return pipe


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
