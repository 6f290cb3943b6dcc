r"""Sample images from a class-conditional DDPM or a distilled one-step generator.

  python -m sfd_jax.sample --checkpoint=RUN_DIR --classes=x0 --n_per_class=100 --out=samples/
  python -m sfd_jax.sample --checkpoint=ckpt-49999.pth --config=configs/cifar10_sfd.py --out=s.npz
  python -m sfd_jax.sample --checkpoint=SD_RUN --prompt="a photo of a dog" --n_per_class=4 --out=samples/

``--checkpoint`` is one of our Orbax checkpoints (a workdir, its ``checkpoints/`` or one step directory) or an
original ``.pth`` (which carries no config: then ``--config`` says the architecture). ``--out X.npz`` writes
``images`` (NHWC float32, data space, unclamped) and ``labels``; ``--out DIR`` writes per-image PNGs named
``{class:03d}_{id:05d}.png`` (ids restart per class, like the original's FID dumps) and ``grid.png``.
"""
from __future__ import annotations

import os

import numpy as np
from absl import flags

from sfd_jax.cli_utils import (UsageError, check_input_file, check_input_path, check_output_path, check_positive,
                               ddpm_sampling_settings, define_ddpm_sampling_flags, define_progress_flag,
                               define_recipe_config_flag, define_seed_flag, parse_classes, run)

define_recipe_config_flag("Recipe config (configs/<recipe>.py), with --config.x.y=... overrides. Required for an "
                          "original .pth; replaces the config stored in our checkpoints.")
flags.DEFINE_string("checkpoint", None, "Our checkpoint directory or an original .pth file.")
define_ddpm_sampling_flags()
flags.DEFINE_string("classes", "", "Comma list of classes ('0,3,5'), or 'x0,x3' for all classes except those. "
                    "Default: all classes.")
flags.DEFINE_integer("n_per_class", 10, "Images per class.")
flags.DEFINE_integer("batch", None, "Global batch size (default: config.sampling.batch_size).")
define_seed_flag("Random seed (initial noise is drawn per sample, so batch size does not matter).")
flags.DEFINE_string("out", None, "X.npz for arrays, or a directory for PNGs + grid.png.")
flags.DEFINE_string("noise", None, "Replay initial noise from an .npy [N,H,W,C] float32 (needs --labels or one class).")
flags.DEFINE_string("labels", None, "Replay labels from an .npy [N] int (overrides --classes/--n_per_class).")
define_progress_flag()
flags.DEFINE_string("prompt", None, "Stable Diffusion checkpoints: the text prompt (images for seeds --seed ... "
                    "--seed+--n_per_class-1 go to --out/<prompt>/<seed>.png; see `evaluate prompts`).")
FLAGS = flags.FLAGS


def read_npy(path: str, flag: str) -> np.ndarray:
    """An ``.npy`` array (never unpickled: object arrays are refused); UsageError naming ``flag`` otherwise."""
    check_input_file(path, flag)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{flag} {path} is not a readable .npy of numbers ({e})") from None
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise UsageError(f"{flag} {path} is an .npz archive; expected one .npy array")
    return arr


def _read_replay_files() -> tuple[np.ndarray | None, np.ndarray | None]:
    """--labels and --noise, read and type-checked before any model is built."""
    labels = noise = None
    if FLAGS.labels:
        raw = read_npy(FLAGS.labels, "--labels")
        integral = raw.dtype.kind in "iu" or (raw.dtype.kind == "f" and np.isfinite(raw).all()
                                              and np.array_equal(raw, np.round(raw)))
        if not integral:
            raise UsageError(f"--labels {FLAGS.labels} holds {raw.dtype} values; expected integer class labels")
        labels = raw.astype(np.int64).reshape(-1)
    if FLAGS.noise:
        noise = read_npy(FLAGS.noise, "--noise")
        if noise.dtype.kind not in "fiu" or not np.isfinite(noise).all():
            raise UsageError(f"--noise {FLAGS.noise} must hold finite numbers, got {noise.dtype}"
                             + (" with NaN/inf" if noise.dtype.kind == "f" else ""))
        noise = noise.astype(np.float32)
    return labels, noise


def _labels_and_noise(n_classes: int, image_shape, labels, noise) -> tuple[np.ndarray, np.ndarray | None]:
    if labels is None:
        classes = parse_classes(FLAGS.classes, n_classes)
        labels = np.repeat(np.asarray(classes, np.int64), FLAGS.n_per_class)
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if bad.size:
        raise UsageError(f"label {int(bad[0])} is outside [0, {n_classes})")
    if noise is not None and noise.shape != (len(labels),) + tuple(image_shape):
        raise UsageError(f"--noise has shape {noise.shape}, expected {(len(labels),) + tuple(image_shape)} "
                         "(N matching the labels, NHWC)")
    return labels, noise


def write_outputs(out: str, images: np.ndarray, labels: np.ndarray) -> list[str]:
    """Write the npz or the PNG folder; returns the paths written."""
    from sfd_jax.image_io import save_grid, save_png, to_uint8

    if out.endswith(".npz"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        np.savez(out, images=images.astype(np.float32), labels=labels.astype(np.int64))
        return [out]
    os.makedirs(out, exist_ok=True)
    written, counters = [], {}
    u8 = to_uint8(images)
    for img, c in zip(u8, labels):
        i = counters.get(int(c), 0)
        counters[int(c)] = i + 1
        path = os.path.join(out, f"{int(c):03d}_{i:05d}.png")
        save_png(img, path)
        written.append(path)
    per_row = max(counters.values()) if len(counters) > 1 else min(len(labels), 10)
    order = np.argsort(labels, kind="stable")
    grid_path = os.path.join(out, "grid.png")
    save_grid(images[order][: 100 * per_row], grid_path, nrow=min(per_row, 32))
    written.append(grid_path)
    return written


def _is_sd_checkpoint(path: str) -> bool:
    """True for our checkpoints of an SD run (stored config mode 'sd_sfd', or an imported SD UNet)."""
    if not os.path.isdir(path):
        return False
    from sfd_jax.checkpoint import Checkpointer, resolve_checkpoint_dir
    try:
        directory, step = resolve_checkpoint_dir(path)
        ckpt = Checkpointer(directory)
        meta = ckpt.restore_json("meta", step)
        return meta.get("mode") == "sd_sfd" or "unet_config" in meta
    except Exception:  # noqa: BLE001 - not ours or no meta: the DDPM path reports the problem
        return False


def _sample_sd():
    """A one-step SD generator: ``--prompt`` for seeds seed .. seed + n_per_class - 1 (evaluate prompts' layout)."""
    from sfd_jax.eval.sd_prompts import generate_prompt_images
    if not FLAGS.prompt:
        raise UsageError("this is a Stable Diffusion checkpoint: pass --prompt (or use `evaluate prompts`)")
    if FLAGS.out.endswith(".npz"):
        raise UsageError("--out must be a directory for Stable Diffusion checkpoints")
    check_output_path(FLAGS.out, "--out", directory=True)
    seeds = list(range(FLAGS.seed, FLAGS.seed + FLAGS.n_per_class))
    generate_prompt_images(FLAGS.checkpoint, [], seeds, FLAGS.out, prompts=[FLAGS.prompt], weights=FLAGS.weights,
                           batch=FLAGS.batch or 64, progress=FLAGS.progress)
    print(f"wrote {len(seeds)} images to {FLAGS.out}")


def main(argv):
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.checkpoint:
        raise UsageError("--checkpoint is required")
    if not FLAGS.out:
        raise UsageError("--out is required (X.npz or a directory)")
    from sfd_jax.ddpm.sampling import check_sampler_settings
    check_sampler_settings(FLAGS.sampler, FLAGS.skip, FLAGS.weights)
    check_positive(batch=FLAGS.batch, n_per_class=FLAGS.n_per_class, steps=FLAGS.steps)
    check_input_path(FLAGS.checkpoint, "--checkpoint")
    check_output_path(FLAGS.out, "--out", directory=not FLAGS.out.endswith(".npz"))

    if FLAGS.prompt is not None or _is_sd_checkpoint(FLAGS.checkpoint):
        return _sample_sd()
    replay_labels, replay_noise = _read_replay_files()
    from sfd_jax.ddpm.sampling import CheckpointSampler    # heavy imports after the cheap checks

    sampler = CheckpointSampler(FLAGS.checkpoint, **ddpm_sampling_settings())
    labels, noise = _labels_and_noise(sampler.n_classes, sampler.image_shape, replay_labels, replay_noise)
    images = sampler.sample(labels, batch_size=FLAGS.batch, seed=FLAGS.seed, noise=noise, progress=FLAGS.progress)
    net = sampler.network
    written = write_outputs(FLAGS.out, images, labels)
    print(f"sampled {len(labels)} images with {sampler.sampler_name} from {net.name} of {net.source}; "
          f"wrote {written[0] if len(written) == 1 else f'{len(written)} files to {FLAGS.out}'}")


def cli():
    run(main, "sfd_jax.sample")


if __name__ == "__main__":
    cli()
