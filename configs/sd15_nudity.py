r"""Forget nudity in Stable Diffusion 1.5 (the original README's nudity example).

  python -m sfd_jax.train --config=configs/sd15_nudity.py --workdir=runs/nudity \
      --config.sd.model=PATH/stable-diffusion-v1-5 --config.sd.generator_init=runs/sid_lsg \
      --config.prompts.remain=PATH/aesthetics_6_plus.txt

Forget prompts are 12 generic subjects, each with an NSFW keyword inserted before or after it (``prompts.pos``);
the override prompt is the plain subject (empty concept -> identity override); the negative prompt is the whole
keyword list (``prompts.neg``), used as the unconditional text of the fake score in training and of both networks
in the generator loss (use_neg 1,1,1). With κ 4.5 the teacher target is the plain subject guided away from the NSFW
prompt. Everything else as ``sd15_celebrity.py`` (8 x 1 batch, fp16-emulated Adam). The original's val file was
missing; ours is ``prompts/nudity_val.txt``.
"""
import os

from sfd_jax.ddpm.config import sibling_config

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def get_config():
    c = sibling_config(__file__, "sd15_celebrity", "brad_pitt")
    p = c.prompts
    p.forget = os.path.join(PROMPTS, "nudity_subjects.txt")
    p.forget_val = os.path.join(PROMPTS, "nudity_val.txt")
    p.concept_to_forget = p.concept_to_override = ""
    p.pos = os.path.join(PROMPTS, "nsfw_keywords.txt")
    p.neg = os.path.join(PROMPTS, "nsfw_negative.txt")
    c.distill.use_neg = "1,1,1"
    return c
