"""The Stable Diffusion SFD recipe base (the original's ``SD/train.py`` flags and ``run_sfd.sh``;
README: "The original release and our differences" › SD distillation), under names close to the original flags.
``configs/sd15_*.py`` start from :func:`sd_sfd_config`.

Original flag -> key: --sd_model -> sd.model; --resolution -> sd.resolution; --from_distill_ema -> sd.generator_init
(our checkpoint, e.g. made by ``convert sid-lsg``); --init_timestep, --alpha, --tmin, --tmax, --cfg_train_fake
(κ1), --cfg_eval_fake (κ2 = κ3), --cfg_eval_real (κ4), --sg_remain_coef, --sg_forget_coef, --g_remain_coef,
--g_forget_coef, --use_neg, --sid_w_neg, --sg_w_override, --ls, --lsg, --num_steps -> distill.*;
--data_prompt_text -> prompts.remain; --forget_data_prompt_text(_val) -> prompts.forget(_val); --concept_to_forget,
--concept_to_override -> prompts.*; --override/pos/neg_data_prompt_text -> prompts.override/pos/neg;
--optimizer, --lr, --glr -> optim.*; --batch, --batch-gpu -> training.batch, training.batch_per_device;
--duration (Mimg) -> training.duration_kimg; --tick, --snap, --dump -> training.tick_kimg, snap_ticks, dump_ticks;
--ema (Mimg) -> training.ema_halflife_kimg; --seed -> seed; --fp16 -> optim.precision='fp16_emulated' (we keep
float32 master weights;
README: "The original release and our differences" › Where we differ: SD).
"""
from __future__ import annotations

import ml_collections


def sd_sfd_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "sd_sfd"
    c.seed = 0
    c.dtype = "bfloat16"          # compute dtype of the UNets / text encoder / VAE: float32 | bfloat16 | float16
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 14))

    c.sd = ml_collections.ConfigDict(dict(
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",  # diffusers folder or Hub id (runwayml's is gone)
        variant="",               # weight file variant to read, e.g. 'fp16' ('' = default files)
        resolution=512,           # pixels; latents are resolution / 8
        attention="xla",          # xla | cudnn | auto
        remat=False,              # rematerialise UNet blocks in the backward pass (memory for compute)
        generator_init=""))       # our checkpoint that initialises G ('' = the teacher); --from_distill_ema

    c.prompts = ml_collections.ConfigDict(dict(
        remain="",                # file, or folder with aesthetics_6_plus.txt (LAION-Aesthetics 6+ captions)
        forget="",                # forget prompt file ('' = build from concept_to_forget, '|' lists tiled)
        forget_val="",            # prompts for the snapshot grids only
        concept_to_forget="",     # regex (case-insensitive) replaced in every forget prompt ...
        concept_to_override="",   # ... by this string to make its override prompt
        override="",              # override prompt file instead (cartesian product forget x override)
        pos="",                   # keywords inserted before/after forget prompts (p = 1/2 each)
        neg="",                   # negative prompts paired with override prompts
        # ours: several concepts in one run, a CSV concept,override,forget_prompts[,override_prompts] (paths relative
        # to it; sfd_jax.data.prompts.read_forget_table); replaces forget, concept_to_forget/override and override
        forget_table="",
        max_size=10000,
        shuffle_seed=0))

    c.distill = ml_collections.ConfigDict(dict(
        init_timestep=625, num_steps=1, alpha=1.0, tmin=20, tmax=980,
        cfg_train_fake=1.0,       # κ1: guidance of the fake score while it is trained (w = 1: none)
        cfg_eval_fake=1.0,        # κ2 = κ3: guidance of the fake score inside the G loss
        cfg_eval_real=1.0,        # κ4: guidance of the teacher inside the G loss
        sg_remain_coef=1.0, sg_forget_coef=0.01, g_remain_coef=1.0, g_forget_coef=0.01,
        use_neg="0,0,1",          # negatives as unconditional text in (fake training, fake in G loss, teacher)
        sid_w_neg=False,          # remain phases draw a random negative prompt per sample
        sg_w_override=False,      # G forget loss evaluates the fake score at the override prompts
        ls=1.0, lsg=1.0,          # loss scaling of the fake-score / G losses (never unscaled, as the original)
        context_dropout=0.1))     # p("") of the fake-score prompts, applied iff κ1 != 1 or κ2 != 1

    c.optim = ml_collections.ConfigDict(dict(
        optimizer="adam",         # adam | adamw (weight_decay applies to adamw only)
        lr=1e-6, glr=1e-6, beta1=0.0, beta2=0.999, eps=1e-8, weight_decay=0.01,
        precision="fp32",         # fp32 | fp16_emulated (fp16 weights and Adam moments, as the original --fp16)
        g_clip_value=0.0,         # clip_grad_value_ of G (the original: 1 only with --fp16); 0 = off
        sg_clip_value=0.0))       # the original never clips the fake score

    c.training = ml_collections.ConfigDict(dict(
        batch=512, batch_per_device=0,   # global batch; micro-batch per device (0 = batch / devices, no accumulation)
        duration_kimg=200000.0, tick_kimg=2.0, snap_ticks=50, dump_ticks=100,
        ema_halflife_kimg=500.0, ema_rampup=0.05,   # 0 = no EMA (G_ema is G)
        grid_steps=(1, 2, 4), grid_items=16, grid_seed=2024,
        max_to_keep=0, async_checkpoints=True))
    return c


def tiny_sd_overrides(c: ml_collections.ConfigDict, model: str) -> ml_collections.ConfigDict:
    """Shrink a recipe for smoke runs on a CPU: a tiny random pipeline at ``model`` (``python -m
    sfd_jax.sd.random_pipeline --out DIR``), float32, batch 2, a few steps with a snapshot every tick."""
    c.sd.model = model
    c.sd.resolution = 16
    c.dtype = "float32"
    c.training.batch = 2
    c.training.duration_kimg = 0.006
    c.training.tick_kimg = 0.002
    c.training.snap_ticks = 1
    c.training.dump_ticks = 1
    c.training.grid_items = 2
    return c


def sd_pretrain_config() -> ml_collections.ConfigDict:
    """Text-to-image latent-diffusion training (``mode='sd_pretrain'``, :mod:`sfd_jax.sd.pretrain`): the UNet of
    ``sd.model`` trained on captioned images, its VAE and CLIP text encoder frozen."""
    c = ml_collections.ConfigDict()
    c.mode = "sd_pretrain"
    c.seed = 0
    c.dtype = "float32"
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 14))
    c.sd = ml_collections.ConfigDict(dict(
        model="",                 # diffusers pipeline folder: its UNet is the starting point, VAE + text encoder frozen
        variant="", attention="xla", remat=False))
    c.data = ml_collections.ConfigDict(dict(
        dataset="digits",         # digits | fashion_mnist | path to an npz (images NHWC uint8, labels)
        class_names="",           # file, one name per line ('' = built-in / the npz's class_names)
        templates="",             # caption templates with {name}, one per line ('' = the shipped defaults)
        split="train", random_flip=False))
    c.training = ml_collections.ConfigDict(dict(
        batch=128, n_iters=1000, log_freq=50, snapshot_freq=500,
        caption_dropout=0.1,      # p(caption -> "") for classifier-free guidance
        ema_rate=0.999, sample_posterior=True,
        grid_per_class=8, grid_steps=25, grid_guidance=3.0,   # snapshot grids: DDIM steps, guidance w
        max_to_keep=0, async_checkpoints=True))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                             grad_clip=1.0))
    return c
