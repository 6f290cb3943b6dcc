r"""Sample a Stable Diffusion pipeline: DDIM + classifier-free guidance + VAE decode to PNGs.

  python -m sfd_jax.sd.sample --model DIR --prompt "a photo of a cat" [--negative_prompt "..."] \
      --steps 50 --guidance 7.5 --seed 0 [--height 512 --width 512] --n 4 --out samples/

The sanity tool that a loaded model (a Hub/diffusers folder, or one exported by ``sfd_jax.convert
export-diffusers``) works. Guidance is SD's ``uncond + w*(cond - uncond)`` (w = 1: none, a single pass); the
unconditional text is ``--negative_prompt`` (default ""). The batch is sharded over ``jax.devices()``; the
initial noise is drawn per sample from ``fold_in(seed, i)``, so images do not depend on the batch size or device
count. Writes ``{i:05d}.png`` per image and ``grid.png``.
"""
from __future__ import annotations

import math
import os

import numpy as np
from absl import flags

from sfd_jax.cli_utils import UsageError, check_output_path, check_positive, run

flags.DEFINE_string("model", None, "Diffusers SD pipeline folder (or Hub repo id when online).")
flags.DEFINE_string("prompt", None, "Text prompt.")
flags.DEFINE_string("negative_prompt", "", "Unconditional / negative text for guidance.")
flags.DEFINE_integer("steps", 50, "DDIM steps.")
flags.DEFINE_float("guidance", 7.5, "Guidance scale w: uncond + w*(cond - uncond); 1 = no guidance.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("height", None, "Image height in pixels (default: the UNet's sample_size x the VAE factor).")
flags.DEFINE_integer("width", None, "Image width in pixels (default as --height).")
flags.DEFINE_integer("n", 1, "Number of images.")
flags.DEFINE_integer("batch", None, "Images per device step, global (default: --n rounded up to the device count).")
flags.DEFINE_string("out", None, "Output folder for PNGs.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype (parameters stay fp32).")
flags.DEFINE_string("variant", None, "Weight file variant to read, e.g. fp16.")
flags.DEFINE_enum("attention", "xla", ["xla", "cudnn", "auto"], "Attention implementation.")
flags.DEFINE_integer("clip_skip", 0, "Use the text encoder's layer -(1+clip_skip) (0: last layer).")
FLAGS = flags.FLAGS


def make_sampler(comps, *, steps: int, guidance: float, clip_skip: int = 0):
    """A jittable ``f(unet_params, vae_params, te_params, noise [B,h,w,4], cond_ids [1,L], uncond_ids [1,L])
    -> images [B,H,W,3] float32 in roughly [-1, 1]``."""
    import jax
    import jax.numpy as jnp

    from sfd_jax.models.clip_text import text_embeddings
    from sfd_jax.models.vae import decode_latents
    from sfd_jax.sd.generator import cfg_guided_eps
    from sfd_jax.sd.scheduler import ddim_sample

    unet, vae, te, schedule = comps.unet, comps.vae, comps.text_encoder, comps.schedule

    def sample(unet_params, vae_params, te_params, noise, cond_ids, uncond_ids):
        b = noise.shape[0]
        cond = text_embeddings(te, te_params, cond_ids, clip_skip)
        uncond = text_embeddings(te, te_params, uncond_ids, clip_skip)
        cond_b = jnp.broadcast_to(cond, (b,) + cond.shape[1:])
        uncond_b = jnp.broadcast_to(uncond, cond_b.shape)

        def model_fn(x, t):
            return cfg_guided_eps(unet, unet_params, x, t, cond_b, uncond_b, guidance)

        latents = ddim_sample(model_fn, noise, schedule, steps)
        return decode_latents(vae, vae_params, latents)

    return jax.jit(sample)


def _image_size(comps) -> tuple[int, int, int]:
    factor = 2 ** (len(comps.vae.block_out_channels) - 1)
    default = comps.unet.sample_size * factor
    h, w = FLAGS.height or default, FLAGS.width or FLAGS.height or default
    unit = factor * 2 ** (len(comps.unet.block_out_channels) - 1)
    for name, v in (("--height", h), ("--width", w)):
        if v <= 0 or v % unit:
            raise UsageError(f"{name} must be a positive multiple of {unit} for this model, got {v}")
    return h, w, factor


def main(argv):
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("model", "prompt", "out"):
        if not FLAGS[name].value and FLAGS[name].value != "":
            raise UsageError(f"--{name} is required")
    check_positive(n=FLAGS.n, steps=FLAGS.steps, batch=FLAGS.batch, height=FLAGS.height, width=FLAGS.width)
    if FLAGS.clip_skip < 0:
        raise UsageError(f"--clip_skip must be >= 0, got {FLAGS.clip_skip}")
    check_output_path(FLAGS.out, "--out", directory=True)

    import jax
    import jax.numpy as jnp

    from sfd_jax.image_io import make_grid, save_png, to_uint8
    from sfd_jax.parallel import batch_divisor, batch_sharding, make_mesh, replicated
    from sfd_jax.sd.pipeline import load_components
    from sfd_jax.sd.tokenizer import tokenize

    comps = load_components(FLAGS.model, dtype=jnp.dtype(FLAGS.dtype), variant=FLAGS.variant,
                            attention_impl=FLAGS.attention)
    if FLAGS.steps > comps.schedule.num_train_timesteps:
        raise UsageError(f"--steps must be at most {comps.schedule.num_train_timesteps}")
    h, w, factor = _image_size(comps)
    mesh = make_mesh()
    div = batch_divisor(mesh)
    batch = FLAGS.batch or FLAGS.n
    batch = int(math.ceil(batch / div) * div)

    cond_ids = jnp.asarray(tokenize(comps.tokenizer, [FLAGS.prompt]))
    uncond_ids = jnp.asarray(tokenize(comps.tokenizer, [FLAGS.negative_prompt]))
    rep, shard = replicated(mesh), batch_sharding(mesh)
    params = jax.device_put((comps.unet_params, comps.vae_params, comps.text_encoder_params), rep)
    sampler = make_sampler(comps, steps=FLAGS.steps, guidance=FLAGS.guidance, clip_skip=FLAGS.clip_skip)

    key = jax.random.key(FLAGS.seed)
    shape = (h // factor, w // factor, comps.unet.in_channels)
    draw = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)))
    os.makedirs(FLAGS.out, exist_ok=True)
    images = []
    for start in range(0, FLAGS.n, batch):
        noise = jax.device_put(draw(jnp.arange(start, start + batch)), shard)
        out = np.asarray(jax.device_get(sampler(*params, noise, cond_ids, uncond_ids)))
        images.append(out[: FLAGS.n - start])
    imgs = to_uint8(np.concatenate(images))
    for i, img in enumerate(imgs):
        save_png(img, os.path.join(FLAGS.out, f"{i:05d}.png"))
    save_png(make_grid(imgs, nrow=min(len(imgs), int(math.ceil(math.sqrt(len(imgs)))))),
             os.path.join(FLAGS.out, "grid.png"))
    print(f"wrote {len(imgs)} images ({h}x{w}) to {FLAGS.out}")


def cli():
    run(main, "sfd_jax.sd.sample")


if __name__ == "__main__":
    cli()
