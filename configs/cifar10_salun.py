"""SalUn on CIFAR-10: ``configs/cifar10_salun.py:mask`` (mode ``salun_mask``) then ``configs/cifar10_salun.py``
(mode ``salun``), both from a pretrained checkpoint:

  python -m sfd_jax.train --config=configs/cifar10_salun.py:mask --workdir=runs/mask --config.init_checkpoint=ckpt.pth
  python -m sfd_jax.train --config=configs/cifar10_salun.py --workdir=runs/salun --config.init_checkpoint=ckpt.pth \
      --config.unlearn.mask_path=runs/mask

The original's values: its train.py flag defaults (random label, α 1, mask ratio 0.5, guidance 2 in the mask's
loss) and the pretraining optimizer (Adam 2e-4, β1 0.9, global-norm clip 1, label dropout 0.1), batch 128. The
original sets no step count for this mode: 1,000 steps is our choice.
"""
from sfd_jax.ddpm.baselines.config import first_stage, salun_config


def get_config(variant: str = "salun"):
    c = salun_config(mask=first_stage(variant, "mask", "salun"))
    c.training.n_iters = 1000
    return c
