"""Run K train steps of a tiny task on whatever devices/processes this process sees; write the results to an npz.

  python tests/scripts/run_steps.py ddpm OUT.npz INIT_CKPT --steps 3 --data 2 --fsdp 4 [--fused 0] [--adam_eps E]
  python tests/scripts/run_steps.py sd OUT.npz PIPELINE_DIR --steps 2 --data 2 --fsdp 4 [--batch_per_device 1]
Used by the sharding and multi-process tests (tests/method/test_task_twins.py): losses per step (columns in sorted
metric-name order), every leaf of the final state (gathered, as float32) and each leaf's per-device shard shape.
``RUN_STEPS_WORKDIR`` names the workdir (the processes of a multi-process run share it).
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def ddpm_steps(a, workdir):
    """tests/configs/tiny_test.py SFD steps from the teacher checkpoint ``a.source``."""
    from sfd_jax.ddpm.trainer import Trainer
    from tests.conftest import load_config

    cfg = load_config("tiny_test")
    cfg.init_checkpoint = a.source
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.fsdp_min_size = a.data, a.fsdp, 4096
    cfg.distill.fused = bool(a.fused)
    if a.adam_eps is not None:
        cfg.g_optim.eps = cfg.sg_optim.eps = a.adam_eps
    tr = Trainer(cfg, workdir)
    state, sh, teacher, txs = tr.build()
    step = tr.make_step(sh, txs)
    losses = []
    for _ in range(a.steps):
        state, m = step(state, teacher, tr.root_key)
        losses.append([float(m[k]) for k in sorted(m)])
    return state, losses


def sd_steps(a, workdir):
    """The tiny celebrity recipe's SD SFD steps on the pipeline folder ``a.source``."""
    from sfd_jax.sd.config import tiny_sd_overrides
    from sfd_jax.sd.trainer import SDTrainer
    from tests.conftest import load_config

    cfg = tiny_sd_overrides(load_config("sd15_celebrity"), a.source)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.fsdp_min_size = a.data, a.fsdp, 4096
    cfg.training.batch, cfg.training.batch_per_device = a.batch, a.batch_per_device
    cfg.training.ema_halflife_kimg = 0.5
    cfg.optim.precision = a.precision
    cfg.optim.eps = a.adam_eps if a.adam_eps is not None else 1e-4
    tr = SDTrainer(cfg, workdir)
    state, sh, frozen, frozen_sh, txs = tr.build()
    step = tr.make_step(sh, frozen_sh, txs)
    losses = []
    for i in range(a.steps):
        state, m = step(state, frozen, tr.device_batch(i), tr.root_key)
        losses.append([float(m[k]) for k in sorted(m)])
    return state, losses


TASKS = {"ddpm": ddpm_steps, "sd": sd_steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("out")
    ap.add_argument("source", help="ddpm: teacher checkpoint; sd: pipeline folder")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--data", type=int, default=-1)
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--adam_eps", type=float, default=None, help="Adam eps of both optimizers")
    ap.add_argument("--fused", type=int, default=1, help="ddpm: fused remain/forget passes")
    ap.add_argument("--batch", type=int, default=8, help="sd: global batch")
    ap.add_argument("--batch_per_device", type=int, default=0, help="sd: micro-batch per device (0: all)")
    ap.add_argument("--precision", default="fp32", help="sd: optim.precision")
    a = ap.parse_args()

    from sfd_jax import parallel
    parallel.maybe_initialize_distributed()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    state, losses = TASKS[a.task](a, os.environ.get("RUN_STEPS_WORKDIR") or tempfile.mkdtemp())
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
