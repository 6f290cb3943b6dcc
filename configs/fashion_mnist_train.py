"""Class-conditional DDPM pretraining on Fashion-MNIST (a real-data recipe beyond digits; not an original config).

Data: the Debian package ``dataset-fashion-mnist`` (idx files in /usr/share/datasets/fashion-mnist; any folder with
``train-images-idx3-ubyte[.gz]`` etc. works via ``--config.data.path``). The 28x28 grey images are resized to
32x32 (PIL bilinear, once at load time) and kept at 1 channel. Model and optimiser are cifar10_train.py's (ch 128,
ch_mult (1,2,2,2), attention at 16x16, Adam 2e-4, EMA 0.9999, 10% label dropout) with 1 input/output channel;
200k steps of batch 128 (~430 epochs; CIFAR-10's 800k are not needed for grey 32x32 clothes).

  python -m sfd_jax.train --config=configs/fashion_mnist_train.py --workdir=runs/fmnist_teacher
"""
from sfd_jax.ddpm.config import pretrain_config

FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"


def get_config():
    c = pretrain_config(dataset="FashionMNIST", image_size=32, ch_mult=(1, 2, 2, 2))
    c.data.path = FASHION_MNIST_PATH
    c.data.channels = 1
    c.model.in_channels = c.model.out_ch = 1
    c.training.n_iters = 200000
    return c
