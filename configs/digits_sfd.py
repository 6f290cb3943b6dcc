"""The demo's SFD run: one-stage SFD on 8x8 digits from the ``digits_pretrain`` teacher, forgetting digit 0.

``python -m sfd_jax.demo`` runs it; on its own (after pretraining the teacher):
``python -m sfd_jax.train --config=configs/digits_sfd.py --workdir=runs/digits_sfd
  --config.init_checkpoint=runs/digits_teacher --config.distill.label_to_forget=3``.
Architecture as the teacher's. Deviations from cifar10_sfd.py, for a run of minutes instead of days: see the
comments below.
"""
import importlib.util
import os

from sfd_jax.config_base import distill_config


def _teacher():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_pretrain.py")
    spec = importlib.util.spec_from_file_location("digits_pretrain", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config():
    t = _teacher()
    c = distill_config(sg_lr=1e-4, sg_forget_coef=0.01, g_forget_coef=0.01, label_to_forget=0,
                       dataset="digits", image_size=8, ch_mult=t.model.ch_mult)
    c.data = t.data
    for k in ("in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout"):
        c.model[k] = t.model[k]
    c.init_checkpoint = ""            # the teacher's workdir (the demo sets it)
    c.model.ema_rate = 0.99
    c.g_optim.lr = 1e-4
    c.training.batch_size = 32
    c.training.n_iters = 300
    c.training.snapshot_freq = 300
    c.training.log_freq = 25
    c.training.visualization_samples = 100
    c.sampling.batch_size = 500
    return c
