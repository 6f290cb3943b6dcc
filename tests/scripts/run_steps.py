"""Run K SFD steps of the tiny config on whatever devices/processes this process sees; write results to an npz.

  python tests/scripts/run_steps.py OUT.npz INIT_CKPT --steps 3 --data 2 --fsdp 4
Used by the sharding and multi-process tests: losses per step, every parameter of the final state (gathered),
and for each state leaf the global and per-device shard shapes.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("init")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--data", type=int, default=-1)
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--fused", type=int, default=1)
    ap.add_argument("--adam_eps", type=float, default=None)
    a = ap.parse_args()

    from sfd_jax import parallel
    parallel.maybe_initialize_distributed()
    import numpy as np
    from jax.experimental import multihost_utils

    from sfd_jax.ddpm.trainer import Trainer
    from tests.conftest import load_config

    cfg = load_config("tiny_test")
    cfg.init_checkpoint = a.init
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.fsdp_min_size = a.data, a.fsdp, 4096
    cfg.distill.fused = bool(a.fused)
    if a.adam_eps is not None:
        cfg.g_optim.eps = cfg.sg_optim.eps = a.adam_eps
    workdir = os.environ.get("RUN_STEPS_WORKDIR") or tempfile.mkdtemp()
    tr = Trainer(cfg, workdir)
    state, sh, teacher, txs = tr.build()
    step = tr.make_step(sh, txs)
    losses = []
    for _ in range(a.steps):
        state, m = step(state, teacher, tr.root_key)
        losses.append([float(m[k]) for k in sorted(m)])
    out = {"losses": np.array(losses), "n_devices": np.array(jax.device_count())}
    flat = jax.tree_util.tree_flatten_with_path(
        {"generator": state.generator, "generator_ema": state.generator_ema, "fake_score": state.fake_score,
         "g_opt": state.g_opt, "sg_opt": state.sg_opt})[0]
    print("steps done", losses, flush=True)
    for kp, leaf in flat:
        name = jax.tree_util.keystr(kp)
        out["param" + name] = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        out["shard" + name] = np.array(leaf.addressable_shards[0].data.shape)
    if jax.process_index() == 0:
        np.savez(a.out, **out)


if __name__ == "__main__":
    main()
