"""The demo's SFD run: one-stage SFD on 8x8 digits from the ``digits_pretrain`` teacher, forgetting digit 0.

``python -m sfd_jax.demo`` runs it; on its own (after pretraining the teacher):
``python -m sfd_jax.train --config=configs/digits_sfd.py --workdir=runs/digits_sfd
  --config.init_checkpoint=runs/digits_teacher --config.distill.label_to_forget=3``.

The teacher's architecture; otherwise cifar10_sfd.py (alpha 1.2, t_min/t_init/t_max 38/440/712, fake-score forget
coefficient 0.01, override label 1, Adam beta1 0, clipping by value 1.0, teacher = fake score = generator = the
teacher's EMA) except, for a run of 200 steps instead of 50,000:
  * generator and fake-score lr 1e-4 (cifar10: 1e-5 / 1e-5): at 1e-5 the generator barely moves in 200 steps.
  * generator forget coefficient 0.1 (cifar10: 0.01): with 0.01 the forgotten digit fades over hundreds of steps
    and unevenly (after 300 steps digit 0 was recognised in 1% of its samples, digit 8 still in 39%); with 0.1
    every digit 0-9 is at 0% after 100 steps while the other nine stay at 91-95%.
  * batch 32 (cifar10: 128): an SFD step costs ~8 pretraining steps of the same batch; 32 is enough on 8x8.
  * EMA 0.99 (cifar10: 0.9999): 0.9999 would keep the teacher's weights for the whole run. The demo samples the
    raw generator anyway: after 200 steps a 0.99 EMA still holds 0.99**200 = 13% of the teacher's weights.
"""
from sfd_jax.ddpm.config import distill_config, sibling_config


def get_config():
    t = sibling_config(__file__, "digits_pretrain")
    c = distill_config(sg_lr=0.0001, sg_forget_coef=0.01, g_forget_coef=0.1, label_to_forget=0,
                       dataset="digits", image_size=8, ch_mult=t.model.ch_mult)
    c.data = t.data
    for k in ("in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout"):
        c.model[k] = t.model[k]
    c.init_checkpoint = ""            # the teacher's workdir (the demo sets it)
    c.model.ema_rate = 0.99
    c.g_optim.lr = 0.0001
    c.training.batch_size = 32
    c.training.n_iters = 200
    c.training.snapshot_freq = 100
    c.training.log_freq = 25
    c.training.visualization_samples = 100
    c.sampling.batch_size = 500
    return c
