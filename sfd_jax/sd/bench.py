"""Time the real jitted Stable Diffusion SFD step on random weights (``python -m sfd_jax.bench`` with an SD recipe).

  python -m sfd_jax.bench --config=configs/sd15_celebrity.py --sd_size=sd15 --batch=8 --config.sd.resolution=512
  python -m sfd_jax.bench --config=configs/sd15_celebrity.py --sd_size=tiny --config.sd.resolution=16 \
      --config.dtype=float32 --batch=8

The components are random (:func:`sfd_jax.sd.random_pipeline.random_components`: ``tiny`` or the real SD 1.5 shapes, 860M-
parameter UNets) unless ``--config.sd.model`` is given and ``--sd_size=model``; the step, shardings, donation,
prompt batches and text table are exactly the training ones (:class:`sfd_jax.sd.trainer.SDTrainer`). One step
renders ``batch`` images per phase: images/s counts ``batch`` per step, as the original's kimg counter.
"""
from __future__ import annotations

import tempfile
import time


def _components(config, size: str):
    """Random components of ``size`` (tiny | sd15), or None for 'model' (the trainer loads config.sd.model)."""
    if size == "model":
        return None
    import jax.numpy as jnp

    from sfd_jax.sd.random_pipeline import random_components
    comps = random_components(size, seed=0, dtype=jnp.dtype(config.dtype), tokenizer=True,
                              attention_impl=config.sd.attention)
    return comps._replace(unet=comps.unet.clone(remat=True)) if config.sd.remat else comps


def bench_sd(config, batch: int, steps: int, size: str = "sd15", peak_tflops: float | None = None) -> dict:
    import jax

    from sfd_jax.perf import compiled_flops, measure
    from sfd_jax.sd.trainer import SDTrainer

    config.training.batch = batch
    t0 = time.perf_counter()
    tr = SDTrainer(config, tempfile.mkdtemp(prefix="sfd_bench_"),   # nothing is written to it
                   components=_components(config, size))
    state, sh, frozen, frozen_sh, txs = tr.build()
    setup_s = time.perf_counter() - t0
    step_fn = tr.make_step(sh, frozen_sh, txs)
    batch_arrays = tr.device_batch(0)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, frozen, batch_arrays, tr.root_key).compile()
    compile_s = time.perf_counter() - t0
    flops = compiled_flops(compiled)
    s = tr.step_settings
    if flops and s.rounds > 1:
        # XLA counts a loop body once: the accumulation scan runs it `rounds` times (the optimizer update, outside
        # the loop, is then over-counted, by well under 1% for SD 1.5)
        flops *= s.rounds
    r = measure(compiled, state, lambda i: (frozen, tr.device_batch(i), tr.root_key), steps, batch=batch,
                dtype=config.dtype, flops=flops, peak_tflops=peak_tflops)
    out = {"mode": "sd_sfd", "sd_size": size, "batch": batch, "micro_batch": s.micro, "rounds": s.rounds,
           "resolution": int(config.sd.resolution), "dtype": config.dtype, "precision": config.optim.precision,
           "remat": bool(config.sd.remat), "attention": config.sd.attention, "mesh": dict(tr.mesh.shape),
           "compile_s": compile_s, "setup_s": setup_s, **r}
    if out["peak_memory_bytes"] is not None and jax.devices()[0].memory_stats() is None:
        out["peak_memory_bytes_per_device"] = out["peak_memory_bytes"] // max(jax.device_count(), 1)
    else:
        out["peak_memory_bytes_per_device"] = out["peak_memory_bytes"]
    return out


def compare_precisions(config, batch: int, steps: int, size: str = "tiny") -> dict:
    """The same run (weights, prompts, random numbers) with ``optim.precision`` fp32 and fp16_emulated: per step,
    the relative size of each network's change ‖θ_t − θ_0‖ / ‖θ_0‖, and at the end the distance between the two
    runs' generators relative to the fp32 run's total change. Every other setting (lr, eps, clipping) is the
    config's."""
    import copy

    import jax
    import numpy as np

    from sfd_jax.sd.trainer import SDTrainer

    def flat(tree):
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)])

    comps = _components(config, size)
    out, finals = {}, {}
    for precision in ("fp32", "fp16_emulated"):
        cfg = copy.deepcopy(config)
        cfg.training.batch = batch
        cfg.optim.precision = precision
        tr = SDTrainer(cfg, tempfile.mkdtemp(prefix="sfd_bench_"), components=comps)
        state, sh, frozen, frozen_sh, txs = tr.build()
        g0, f0 = flat(state.generator), flat(state.fake_score)
        step_fn = tr.make_step(sh, frozen_sh, txs)
        rows = []
        for i in range(steps):
            state, m = step_fn(state, frozen, tr.device_batch(i), tr.root_key)
            g, f = flat(state.generator), flat(state.fake_score)
            rows.append({"step": i + 1, "g_rel_change": float(np.linalg.norm(g - g0) / np.linalg.norm(g0)),
                         "fake_rel_change": float(np.linalg.norm(f - f0) / np.linalg.norm(f0)),
                         "g_remain_loss": float(m["g_remain_loss"]), "sg_remain_loss": float(m["sg_remain_loss"])})
        out[precision] = rows
        finals[precision] = (g0, flat(state.generator))
    (a0, a), (b0, b) = finals["fp32"], finals["fp16_emulated"]
    out["g_distance_over_fp32_change"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(a - a0), 1e-30))
    out["g_change_ratio_fp16_over_fp32"] = float(np.linalg.norm(b - b0) / max(np.linalg.norm(a - a0), 1e-30))
    return out
