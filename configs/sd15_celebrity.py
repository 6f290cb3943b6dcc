r"""Forget a celebrity in Stable Diffusion 1.5 (the original ``SD/run_sfd.sh``).

  python -m sfd_jax.train --config=configs/sd15_celebrity.py --workdir=runs/brad_pitt \
      --config.sd.model=PATH/stable-diffusion-v1-5 --config.sd.generator_init=runs/sid_lsg \
      --config.prompts.remain=PATH/aesthetics_6_plus.txt
  python -m sfd_jax.train --config=configs/sd15_celebrity.py:angelina_jolie ...   # the variant

Values of run_sfd.sh: "brad pitt" -> "a middle aged man" (case-insensitive regex), κ1 = κ2 = κ4 = 4.5, alpha 1,
t_init 625, Adam (β 0, 0.999), lr 3e-6 (fake score) / glr 1e-6 (generator), batch 8 (8 devices x 1), all four
coefficients 1.0, no EMA, tick 1 kimg, snapshot and dump every 5 ticks, 1000 kimg. The original ran with --fp16,
i.e. fp16 weights and fp16 Adam moments: we emulate that optimizer (``optim.precision='fp16_emulated'``, eps 1e-6,
G gradients clipped by value 1 as the original does under --fp16) because the learning rates above were chosen
under it: for small gradients fp16 Adam makes SGD-like steps lr·g/eps
(README: "The original release and our differences" › SD precision). Set
``--config.optim.precision=fp32 --config.optim.eps=1e-8 --config.optim.g_clip_value=0`` for plain fp32 Adam, with
re-tuned learning rates. The generator starts from SiD-LSG (``python -m sfd_jax.convert sid-lsg``); without
``sd.generator_init`` it starts from the teacher, which is not a one-step generator yet.

Variant ``angelina_jolie``: the original ships her prompt files but no override concept; ours is "a middle aged
woman".
"""
import os

from sfd_jax.sd.config import sd_sfd_config

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")

CELEBRITIES = {
    "brad_pitt": ("brad pitt", "a middle aged man"),
    "angelina_jolie": ("angelina jolie", "a middle aged woman"),
}


def get_config(variant: str = "brad_pitt"):
    if variant not in CELEBRITIES:
        raise ValueError(f"unknown celebrity variant {variant!r}; expected one of {', '.join(CELEBRITIES)}")
    concept, override = CELEBRITIES[variant]
    c = sd_sfd_config()
    c.prompts.forget = os.path.join(PROMPTS, f"{variant}.txt")
    c.prompts.forget_val = os.path.join(PROMPTS, f"{variant}_val.txt")
    c.prompts.concept_to_forget = concept
    c.prompts.concept_to_override = override
    c.prompts.remain = os.path.join(PROMPTS, "remain_example.txt")  # smoke-test captions; pass LAION's for real runs

    d = c.distill
    d.cfg_train_fake = d.cfg_eval_fake = d.cfg_eval_real = 4.5
    d.alpha, d.init_timestep = 1.0, 625
    d.sg_remain_coef = d.sg_forget_coef = d.g_remain_coef = d.g_forget_coef = 1.0
    d.use_neg, d.sid_w_neg, d.sg_w_override = "0,0,1", False, False

    o = c.optim
    o.optimizer, o.lr, o.glr = "adam", 3e-6, 1e-6
    o.precision, o.eps, o.g_clip_value = "fp16_emulated", 1e-6, 1.0

    t = c.training
    t.batch, t.batch_per_device = 8, 1
    t.duration_kimg, t.tick_kimg, t.snap_ticks, t.dump_ticks = 1000.0, 1.0, 5, 5
    t.ema_halflife_kimg = 0.0
    return c
