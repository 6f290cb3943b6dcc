r"""SFD in the text-to-image world built from labelled images (``python -m sfd_jax.demo --task=sd`` runs both
variants; they follow ``configs/sd15_celebrity.py``'s structure, with values sized for a 2M-parameter UNet on 8x8
latents and a CPU).

  # the one-step student: SiD-LSG distillation of the world's teacher (SFD with forgetting off)
  python -m sfd_jax.train --config=configs/sd_world.py:student --workdir=runs/world_student \
      --config.sd.model=WORLD --config.prompts.remain=WORLD/prompts/all.txt --config.prompts.forget=...
  # forget one class ("a photo of a zero" -> "a photo of a one"), from the student
  python -m sfd_jax.train --config=configs/sd_world.py:forget --workdir=runs/world_forget \
      --config.sd.model=WORLD --config.sd.generator_init=runs/world_student \
      --config.prompts.remain=WORLD/prompts/remain_zero.txt --config.prompts.forget=WORLD/prompts/zero.txt \
      --config.prompts.concept_to_forget=zero --config.prompts.concept_to_override=one

As run_sfd.sh: the teacher at the override prompts, κ1 = κ2 = κ4 (here 3.0, the guidance the world's teacher
samples with; SD 1.5's 4.5 over-saturates a teacher this small), alpha 1, t_init 625, tmin/tmax 20/980, Adam
β (0, 0.999), all four coefficients 1.0 (the student: forget coefficients 0), no EMA, the generator's gradients
clipped by value 1. Different, and why:
  * plain fp32 Adam, lr 1e-4 for both networks, eps 1e-8 (the digits DDPM SFD recipe's values): the original's
    3e-6 / 1e-6 were tuned under fp16 Adam's lr·g/eps steps for an 860M-parameter UNet and 1000 kimg; a run of
    a few hundred steps needs larger ones.
  * batch 16 (8 devices x 1 in the original), one round; 4.8 kimg for the student (300 steps), 3.2 kimg for the
    forgetting (200 steps); one tick per run and grids with one generator step only (each grid size compiles).
"""
from sfd_jax.sd.config import sd_sfd_config

VARIANTS = ("forget", "student")


def get_config(variant: str = "forget"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown sd_world variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    c = sd_sfd_config()
    c.dtype = "float32"
    c.sd.model = ""               # the world's pipeline folder (teacher UNet, VAE, text encoder)
    c.sd.resolution = 8
    c.prompts.shuffle_seed = 0

    d = c.distill
    d.cfg_train_fake = d.cfg_eval_fake = d.cfg_eval_real = 3.0
    d.alpha, d.init_timestep, d.tmin, d.tmax = 1.0, 625, 20, 980
    d.sg_remain_coef = d.sg_forget_coef = d.g_remain_coef = d.g_forget_coef = 1.0
    d.use_neg, d.sid_w_neg, d.sg_w_override = "0,0,1", False, False

    o = c.optim
    o.optimizer, o.lr, o.glr, o.precision, o.eps, o.g_clip_value = "adam", 1e-4, 1e-4, "fp32", 1e-8, 1.0

    t = c.training
    t.batch, t.batch_per_device = 16, 0
    t.duration_kimg = 3.2
    t.ema_halflife_kimg = 0.0
    t.grid_steps, t.grid_items = (1,), 10
    if variant == "student":
        d.sg_forget_coef = d.g_forget_coef = 0.0
        t.duration_kimg = 4.8
    t.tick_kimg, t.snap_ticks, t.dump_ticks = t.duration_kimg, 1000, 1000
    return c
