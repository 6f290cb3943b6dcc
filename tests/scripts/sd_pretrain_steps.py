"""Run K ``sd_pretrain`` steps (configs/sd_world_pretrain.py, batch 8) on the devices this process sees; write an npz.

  python tests/scripts/sd_pretrain_steps.py OUT.npz WORLD_BASE --steps 2 --data 2 --fsdp 4
Used by tests/sd/test_pretrain.py: losses per step, every leaf of the final state (gathered) and its shard shape.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("base")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--data", type=int, default=-1)
    ap.add_argument("--fsdp", type=int, default=1)
    a = ap.parse_args()

    import jax
    import numpy as np

    from sfd_jax.distill.state import state_items
    from sfd_jax.sd.pretrain import SDPretrainTrainer
    from tests.conftest import load_config

    cfg = load_config("sd_world_pretrain")
    cfg.sd.model = a.base
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.fsdp_min_size = a.data, a.fsdp, 4096
    cfg.training.batch = 8
    cfg.optim.eps = 1e-4   # near-zero gradients would make ±lr steps whose sign is rounding noise
    tr = SDPretrainTrainer(cfg, tempfile.mkdtemp())
    state, sh, frozen, frozen_sh, tx = tr.build()
    step = tr.make_step(sh, frozen_sh, tx)
    losses = []
    for i in range(a.steps):
        state, m = step(state, frozen, tr.device_batch(i), tr.root_key)
        losses.append([float(m[k]) for k in sorted(m)])
    out = {"losses": np.array(losses), "n_devices": np.array(jax.device_count())}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state_items(state))[0]:
        name = jax.tree_util.keystr(kp)
        out["param" + name] = np.asarray(jax.device_get(leaf)).astype(np.float32)
        out["shard" + name] = np.array(leaf.addressable_shards[0].data.shape)
    np.savez(a.out, **out)


if __name__ == "__main__":
    main()
