r"""Host-memory check: peak RSS while loading a full-size SD 1.5 UNet from safetensors.

  python -m sfd_jax.sd.memcheck [--dir DIR] [--keep]

Writes a random SD 1.5 UNet (the real config, 859,520,964 parameters, float32, 3.44 GB) with diffusers'
``save_pretrained`` into DIR/unet (a temporary folder by default; needs torch + diffusers, run in a child process
so its memory is not counted), then loads it in a fresh child process with :func:`sfd_jax.sd.pipeline.load_model` and
reports the peak resident set size (VmHWM) before and after, as JSON. The target is a peak below 2x the fp32
weight size: the loader converts one tensor at a time and re-opens the memory-mapped file every 512 MB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_WRITE = r"""
import json, sys, torch
from diffusers import UNet2DConditionModel
torch.manual_seed(0)
unet = UNet2DConditionModel(**json.loads(sys.argv[1]))
unet.save_pretrained(sys.argv[2], safe_serialization=True)
"""

_LOAD = r"""
import json, sys, time

def vm(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import jax, numpy as np
from sfd_jax.sd.pipeline import load_model
jax.numpy.zeros(1).block_until_ready()
before = vm('VmHWM')
t = time.time()
module, params, _ = load_model(sys.argv[1], 'unet')
jax.block_until_ready(params)
seconds = time.time() - t
n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
print(json.dumps({'params': n, 'fp32_bytes': 4 * n, 'peak_rss_before_load': before,
                  'peak_rss_after_load': vm('VmHWM'), 'rss_after_load': vm('VmRSS'), 'load_seconds': seconds}))
"""


def run(directory: str) -> dict:
    unet_dir = os.path.join(directory, "unet")
    weights = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if not os.path.isfile(weights):
        print(f"writing a random SD 1.5 UNet to {unet_dir} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", _WRITE, json.dumps(SD15_UNET_CONFIG), unet_dir], check=True, env=env)
    out = subprocess.run([sys.executable, "-c", _LOAD, unet_dir], check=True, env=env, capture_output=True,
                         text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["file_bytes"] = os.path.getsize(weights)
    result["peak_over_fp32"] = result["peak_rss_after_load"] / result["fp32_bytes"]
    result["load_increase_over_fp32"] = (result["peak_rss_after_load"] - result["peak_rss_before_load"]) / \
        result["fp32_bytes"]
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sfd_jax.sd.memcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="folder for (or with) the random UNet; default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.dir:
        result = run(args.dir)
    else:
        tmp = tempfile.mkdtemp(prefix="sd_memcheck_")
        try:
            result = run(tmp)
        finally:
            if not args.keep:
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
    gb = {k: round(v / 2 ** 30, 3) for k, v in result.items() if k.endswith("bytes") or k.startswith(("peak_rss",
                                                                                                           "rss_"))}
    print(json.dumps({**result, "GiB": gb}, indent=2))


if __name__ == "__main__":
    main()
