"""One-stage SFD on Fashion-MNIST: forget class 0 (T-shirt/top), teacher at class 1 (Trouser) for its samples.

cifar10_sfd.yml's values (fake-score lr 1e-5, generator lr 1e-5, forget coefficients 0.01, alpha 1.2,
t_min/t_init/t_max 38/440/712, batch 128, 50k steps) on the fashion_mnist_train.py architecture (1 channel, 32x32).

  python -m sfd_jax.train --config=configs/fashion_mnist_sfd.py --workdir=runs/fmnist_sfd \
      --config.init_checkpoint=runs/fmnist_teacher --config.distill.label_to_forget=0
"""
from sfd_jax.ddpm.config import distill_config, sibling_config


def get_config():
    p = sibling_config(__file__, "fashion_mnist_train")
    c = distill_config(sg_lr=0.00001, sg_forget_coef=0.01, g_forget_coef=0.01, label_to_forget=0,
                       dataset="FashionMNIST", image_size=32, ch_mult=p.model.ch_mult)
    c.data.path = p.data.path
    c.data.channels = 1
    c.model.in_channels = c.model.out_ch = 1
    c.init_checkpoint = ""    # the teacher: a fashion_mnist_train.py workdir (or checkpoints/<step>)
    return c
