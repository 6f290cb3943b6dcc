"""Demo entry point. Until the digits demo lands this is a sampling smoke run on a freshly initialised tiny model:
it writes an Orbax checkpoint to ``--workdir`` and samples a one-step grid from it with ``sfd_jax.sample``."""
from __future__ import annotations

import os

from absl import flags

from sfd_jax.cli_utils import run

flags.DEFINE_string("workdir", "demo_out", "Output directory.")
FLAGS = flags.FLAGS


def main(argv):
    import jax
    from sfd_jax import diffusion
    from sfd_jax.checkpoint import Checkpointer
    from sfd_jax.config_base import distill_config
    from sfd_jax.ddpm_weights import t_init_of
    from sfd_jax.generate import DDPMSampler, generate
    from sfd_jax.images import save_grid
    from sfd_jax.models.ddpm_unet import ConditionalUNet
    import numpy as np

    cfg = distill_config(sg_lr=3e-5, sg_forget_coef=0.01, g_forget_coef=0.01, label_to_forget=0, dataset="tiny",
                         image_size=16, ch_mult=(1, 2))
    cfg.model.ch, cfg.model.num_res_blocks, cfg.model.attn_resolutions = 32, 1, (8,)
    model = ConditionalUNet.from_config(cfg)
    params = model.init_params(jax.random.key(0))
    ckpt = Checkpointer(os.path.join(FLAGS.workdir, "smoke", "checkpoints"))
    ckpt.save(0, {"generator": params, "generator_ema": params}, config=cfg)
    ckpt.wait()
    _, ac = diffusion.schedule_from_config(cfg)
    sampler = DDPMSampler(model, ac, sampler="one_step", t_init=t_init_of(cfg))
    labels = np.repeat(np.arange(10), 4)
    images = generate(sampler, params, labels, image_shape=(16, 16, 3), batch_size=40, seed=0)
    path = os.path.join(FLAGS.workdir, "smoke", "grid.png")
    save_grid(images, path, nrow=4)
    print(f"smoke run OK: checkpoint in {ckpt.directory}, one-step grid of an untrained model in {path}")


def cli():
    run(main, "sfd_jax.demo")


if __name__ == "__main__":
    cli()
