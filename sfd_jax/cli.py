"""``sfd-jax <command> [flags]``: one console script for every entry point (``python -m sfd_jax.<command>``)."""
from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "sample": ("sfd_jax.sample", "sample images from a DDPM or a distilled generator"),
    "convert": ("sfd_jax.convert.__main__", "convert original .pth checkpoints to and from ours"),
    "sample_sd": ("sfd_jax.sd.sample", "sample a Stable Diffusion pipeline (DDIM + CFG) to PNGs"),
    "train": ("sfd_jax.train", "pretrain a DDPM or run SFD/SiD distillation"),
    "bench": ("sfd_jax.bench", "time the jitted train step (images/s, FLOPs, MFU, memory)"),
    "demo": ("sfd_jax.demo", "the end-to-end demo"),
    "evaluate": ("sfd_jax.evaluate", "forgetting metrics, evaluation classifiers, FID/sFID/IS/precision/recall"),
    "sd_random": ("sfd_jax.sd.random_pipeline", "write a random (tiny or SD 1.5-shaped) Stable Diffusion pipeline folder"),
    "sd_tokenizer": ("sfd_jax.sd.tokenizer", "build the CLIP tokenizer files offline from open-clip's BPE list"),
    "sd_memcheck": ("sfd_jax.sd.memcheck", "peak host memory while loading a full-size SD 1.5 UNet"),
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print("usage: sfd-jax <command> [flags]   (each command takes --help)\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:12s} {doc}")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    cmd = sys.argv[1]
    if cmd not in COMMANDS:
        print(f"sfd-jax: error: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    # Run exactly as `python -m <module>` would, so absl's --help lists the command's own flags.
    runpy.run_module(COMMANDS[cmd][0], run_name="__main__", alter_sys=True)
