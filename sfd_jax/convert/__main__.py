r"""Checkpoint conversion.

  python -m sfd_jax.convert ddpm --src ckpt.pth --config configs/cifar10_sfd.py --out DIR
      original DDPM .pth (pretrained or distilled) -> our Orbax checkpoint DIR/checkpoints/<step>/
  python -m sfd_jax.convert ddpm-to-pth --checkpoint DIR --out ckpt.pth
      our checkpoint -> a .pth the original code loads (needs torch)
  python -m sfd_jax.convert export-diffusers --checkpoint CKPT --base SD_DIR --out DIR
      our SD checkpoint's generator -> a complete diffusers pipeline folder (other components from SD_DIR)
  python -m sfd_jax.convert import-diffusers --src UNET_OR_PIPELINE_DIR --out DIR
      a diffusers UNet (folder or pipeline's unet/) -> our checkpoint (item 'generator')
  python -m sfd_jax.convert sid-lsg --src FILE.pkl --out DIR
      the SiD-LSG generator pickle's "ema" UNet -> our checkpoint (read without running code from the file)
"""
from __future__ import annotations

import os

from absl import flags

from sfd_jax.cli_utils import (UsageError, check_input_file, check_input_path, check_output_path,
                               define_recipe_config_flag, run)

define_recipe_config_flag("Recipe config describing the architecture (configs/<recipe>.py).")
flags.DEFINE_string("src", None, "ddpm: the original .pth file; import-diffusers: a UNet or pipeline folder; "
                    "sid-lsg: the generator .pkl.")
flags.DEFINE_string("checkpoint", None, "ddpm-to-pth, export-diffusers: our checkpoint directory.")
flags.DEFINE_string("out", None, "Output: a directory (ddpm) or a .pth file (ddpm-to-pth).")
flags.DEFINE_string("base", None, "export-diffusers: the SD pipeline folder that supplies config and other components.")
flags.DEFINE_bool("trust-pickle", False, "sid-lsg: no longer needed (the pickle is read without running code from "
                  "it); accepted for old command lines.")
FLAGS = flags.FLAGS

COMMANDS = ("ddpm", "ddpm-to-pth", "export-diffusers", "import-diffusers", "sid-lsg")


def convert_ddpm(src: str, config, out: str) -> str:
    """Original .pth -> our checkpoint under ``out``; returns the step directory written."""
    from sfd_jax.checkpoint import Checkpointer
    from sfd_jax.ddpm.networks import NetworkReader

    if not os.path.isfile(src):
        raise FileNotFoundError(f"--src {src!r} does not exist")
    if config is None:
        raise UsageError("--config is required: an original .pth carries no config")
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise UsageError(f"{ckpt_dir} already holds checkpoints; choose an empty --out")
    reader = NetworkReader(src, config, what="--src")
    if not reader.names:
        raise UsageError(f"{src} holds no network weights")
    nets = reader.read()
    ckpt = Checkpointer(ckpt_dir)
    step = 0 if reader.step is None else reader.step
    ckpt.save(step, nets, config=config,
              meta={"source": os.path.abspath(src), "kind": reader.kind, "format": "seed_ddpm_pth", "step": step})
    ckpt.wait()
    ckpt.close()
    return os.path.join(ckpt_dir, str(step))


def export_ddpm(checkpoint: str, out: str) -> None:
    """Our checkpoint -> original .pth (the list layout of the original for its kind)."""
    from sfd_jax.convert.ddpm import save_seed_ddpm_checkpoint
    from sfd_jax.ddpm.networks import NetworkReader, is_seed_checkpoint

    if is_seed_checkpoint(checkpoint):
        raise UsageError(f"--checkpoint {checkpoint} is a file; expected our checkpoint directory")
    reader = NetworkReader(checkpoint, what="--checkpoint")
    nets = reader.read()
    save_seed_ddpm_checkpoint(out, step=reader.step, **nets)


def _check_paths(command: str) -> None:
    """Inputs exist and --out can be written, before anything is read or built."""
    for name in {"ddpm": ("src",), "sid-lsg": ("src",)}.get(command, ()):
        if FLAGS[name].value:
            check_input_file(FLAGS[name].value, f"--{name}")
    for name in {"import-diffusers": ("src",), "export-diffusers": ("checkpoint", "base"),
                 "ddpm-to-pth": ("checkpoint",)}.get(command, ()):
        if FLAGS[name].value:
            check_input_path(FLAGS[name].value, f"--{name}")
    check_output_path(FLAGS.out, "--out", directory=command != "ddpm-to-pth")


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise UsageError(f"expected one command out of {', '.join(COMMANDS)} (got {' '.join(argv[1:]) or 'none'})")
    if not FLAGS.out:
        raise UsageError("--out is required")
    _check_paths(argv[1])
    if argv[1] == "ddpm":
        if not FLAGS.src:
            raise UsageError("--src is required")
        written = convert_ddpm(FLAGS.src, FLAGS.config, FLAGS.out)
        print(f"wrote {written}")
    elif argv[1] in ("export-diffusers", "import-diffusers", "sid-lsg"):
        from sfd_jax.convert import sd_checkpoints as sd

        need = {"export-diffusers": ("checkpoint", "base"), "import-diffusers": ("src",), "sid-lsg": ("src",)}
        for name in need[argv[1]]:
            if not FLAGS[name].value:
                raise UsageError(f"--{name} is required")
        if argv[1] == "export-diffusers":
            written = sd.export_diffusers(FLAGS.checkpoint, FLAGS.base, FLAGS.out)
        elif argv[1] == "import-diffusers":
            written = sd.import_diffusers_unet(FLAGS.src, FLAGS.out)
        else:
            written = sd.import_sid_lsg(FLAGS.src, FLAGS.out, trust_pickle=FLAGS["trust-pickle"].value,
                                        base=FLAGS.base)
        print(f"wrote {written}")
    else:
        if not FLAGS.checkpoint:
            raise UsageError("--checkpoint is required")
        if not os.path.exists(FLAGS.checkpoint):
            raise FileNotFoundError(f"checkpoint {FLAGS.checkpoint!r} does not exist")
        export_ddpm(FLAGS.checkpoint, FLAGS.out)
        print(f"wrote {FLAGS.out}")


def cli():
    run(main, "sfd_jax.convert")


if __name__ == "__main__":
    cli()
