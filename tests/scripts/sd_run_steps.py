"""Run K Stable Diffusion SFD steps of the tiny celebrity recipe on the devices this process sees; write an npz.

  python tests/scripts/sd_run_steps.py OUT.npz PIPELINE_DIR --steps 2 --data 2 --fsdp 4 [--batch_per_device 1]
Used by the sharding tests: losses per step, every leaf of the final state (gathered) and its shard shape.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("pipeline")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--data", type=int, default=-1)
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch_per_device", type=int, default=0)
    ap.add_argument("--precision", default="fp32")
    a = ap.parse_args()

    from sfd_jax import parallel
    parallel.maybe_initialize_distributed()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from sfd_jax.sd.config import tiny_sd_overrides
    from sfd_jax.sd.trainer import SDTrainer
    from tests.conftest import load_config

    cfg = tiny_sd_overrides(load_config("sd15_celebrity"), a.pipeline)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.fsdp_min_size = a.data, a.fsdp, 4096
    cfg.training.batch, cfg.training.batch_per_device = a.batch, a.batch_per_device
    cfg.training.ema_halflife_kimg = 0.5
    cfg.optim.precision = a.precision
    cfg.optim.eps = 1e-4  # near-zero gradients would make ±lr steps whose sign is rounding noise
    tr = SDTrainer(cfg, os.environ.get("RUN_STEPS_WORKDIR") or tempfile.mkdtemp())
    state, sh, frozen, frozen_sh, txs = tr.build()
    step = tr.make_step(sh, frozen_sh, txs)
    losses = []
    for i in range(a.steps):
        state, m = step(state, frozen, tr.device_batch(i), tr.root_key)
        losses.append([float(m[k]) for k in sorted(m)])
    print("steps done", losses, flush=True)
    out = {"losses": np.array(losses), "n_devices": np.array(jax.device_count())}
    flat = jax.tree_util.tree_flatten_with_path(
        {"generator": state.generator, "generator_ema": state.generator_ema, "fake_score": state.fake_score,
         "g_opt": state.g_opt, "sg_opt": state.sg_opt})[0]
    for kp, leaf in flat:
        name = jax.tree_util.keystr(kp)
        out["param" + name] = np.asarray(multihost_utils.process_allgather(leaf, tiled=True)).astype(np.float32)
        out["shard" + name] = np.array(leaf.addressable_shards[0].data.shape)
    if jax.process_index() == 0:
        np.savez(a.out, **out)


if __name__ == "__main__":
    main()
