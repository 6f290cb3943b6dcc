"""Where an SFD run's three networks come from, for .pth files and ours
(README: "The original release and our differences" › DDPM distillation).

pretrained checkpoint (model, ema):   teacher = fake score = generator = ema if init_from_ema else model;
                                      the generator's EMA starts from the same weights (init_from_ema) or from
                                      the file's EMA (not init_from_ema).
distilled checkpoint (fake_score, generator, generator_ema):
                                      fake score = fake_score; generator = generator_ema if init_from_ema else
                                      generator; its EMA = the generator (init_from_ema) or generator_ema;
                                      teacher = the *fake score* (the original's two-stage rule).
``distill.teacher_from='pretrained'`` instead loads teacher and fake score from ``distill.pretrained_checkpoint``
(what the original's broken ``--init_ckpt_0`` flag was meant to do).
Checkpoints are read by :func:`sfd_jax.ddpm.networks.load_all_networks`; this module only applies the rules.
"""
from __future__ import annotations

from sfd_jax.cli_utils import UsageError
from sfd_jax.ddpm.networks import load_all_networks


def _need(nets: dict, name: str, path: str, hint: str = ""):
    if nets.get(name) is None:
        raise UsageError(f"init_checkpoint {path} holds no {name!r} weights{hint}")
    return nets[name]


def init_sfd_networks(config) -> dict:
    """{'teacher', 'fake_score', 'generator', 'generator_ema'} host param trees by the rules above."""
    d = config.distill
    path = config.init_checkpoint
    kind, nets = load_all_networks(path, config)
    from_ema = bool(d.init_from_ema)
    if kind == "pretrained":
        src = _need(nets, "ema" if from_ema else "model", path,
                    " (set distill.init_from_ema=False to start from the raw weights)" if from_ema else "")
        out = dict(teacher=src, fake_score=src, generator=src,
                   generator_ema=src if from_ema else nets.get("ema", src))
    else:
        fake = _need(nets, "fake_score", path, " (an early-stage snapshot cannot seed a run)")
        gen = _need(nets, "generator_ema" if from_ema else "generator", path)
        out = dict(teacher=fake, fake_score=fake, generator=gen,
                   generator_ema=gen if from_ema else nets.get("generator_ema", gen))
    teacher_from = d.get("teacher_from", "fake_score")
    if teacher_from == "pretrained":
        pre_path = d.get("pretrained_checkpoint", "")
        if not pre_path:
            raise UsageError("distill.teacher_from='pretrained' needs distill.pretrained_checkpoint")
        pre_kind, pre = load_all_networks(pre_path, config)
        if pre_kind != "pretrained":
            raise UsageError(f"distill.pretrained_checkpoint {pre_path} is not a pretrained DDPM checkpoint")
        src = _need(pre, "ema" if from_ema else "model", pre_path)
        out["teacher"] = out["fake_score"] = src
    elif teacher_from != "fake_score":
        raise UsageError(f"distill.teacher_from must be 'fake_score' or 'pretrained', got {teacher_from!r}")
    return out
