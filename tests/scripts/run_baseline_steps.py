"""Run a few steps of each given baseline mode (tests/configs/tiny_baselines.py) on whatever devices this process
sees; write per mode the metrics of every step and every leaf of the final state to OUT_<mode>.npz.

  python tests/scripts/run_baseline_steps.py OUT INIT_CKPT ARTIFACTS --modes sa,esd --steps 3 --data 2 --fsdp 4
ARTIFACTS holds fisher.npz + replay.npz (for sa) and mask.npz (for salun).
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
    ap.add_argument("artifacts")
    ap.add_argument("--modes", default="retrain,sa_fim,sa,salun_mask,salun,esd")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--data", type=int, default=-1)
    ap.add_argument("--fsdp", type=int, default=1)
    a = ap.parse_args()
    import numpy as np

    from sfd_jax.ddpm.baseline_trainer import BaselineTrainer
    from tests.ddpm.test_baselines import tiny_config

    for mode in a.modes.split(","):
        cfg = tiny_config(mode)
        cfg.init_checkpoint = a.init if mode != "retrain" else ""
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.fsdp_min_size = a.data, a.fsdp, 4096
        cfg.optim.eps = 1e-4   # see tests/ddpm/test_train.py: rounding-level gradients make ±lr steps at 1e-8
        if mode == "sa":
            cfg.unlearn.fisher_path = a.artifacts
        if mode == "salun":
            cfg.unlearn.mask_path = a.artifacts
        tr = BaselineTrainer(cfg, tempfile.mkdtemp())
        inputs = tr._inputs()
        state, sh, frozen, txs = tr.build()
        if mode == "sa_fim":
            inputs["replay"] = tr._replay(frozen)
        feed, _, close = tr._feed(inputs, frozen, 0)
        step = tr.make_step(sh, txs)
        metrics = []
        for i in range(a.steps):
            state, m = step(state, *feed(i), tr.root_key)
            metrics.append([float(m[k]) for k in sorted(m)])
        close()
        out = {"metrics": np.array(metrics), "n_devices": np.array(jax.device_count())}
        for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            out["leaf" + jax.tree_util.keystr(kp)] = np.asarray(jax.device_get(leaf))
        np.savez(f"{a.out}_{mode}.npz", **out)
        print(mode, "done", metrics, flush=True)


if __name__ == "__main__":
    main()
