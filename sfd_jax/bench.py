r"""Time the real jitted train step: images/s, ms/step, FLOPs per image (XLA cost analysis), MFU, memory.

  python -m sfd_jax.bench --config=configs/cifar10_sfd.py --batch=8 --steps=3
  python -m sfd_jax.bench --config=configs/cifar10_train.py --batch=128 --json --config.dtype=bfloat16
  python -m sfd_jax.bench --config=configs/sd15_celebrity.py --sd_size=sd15 --batch=8   # SD step, see bench_sd

Weights are random (no checkpoint or data needed); the step, shardings and donation are exactly the training
ones. Timing starts after compilation and blocks on the results of every step. With ``--json`` the last line is
one JSON object.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from sfd_jax.cli_utils import UsageError, run

config_flags.DEFINE_config_file("config", None, "Recipe config (configs/<recipe>.py) with --config.x.y overrides.",
                                lock_config=False)
flags.DEFINE_integer("batch", None, "Global batch size (default: the config's training.batch_size).")
flags.DEFINE_integer("steps", 5, "Timed steps (after one compile + warm-up step).")
flags.DEFINE_string("mode", None, "sfd | pretrain | sd_sfd (default: config.mode).")
flags.DEFINE_string("sd_size", "sd15", "sd_sfd: random components of this size (tiny | sd15), or 'model' to load "
                    "config.sd.model.")
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device for MFU (default: from a table by device kind).")
flags.DEFINE_bool("compare_precision", False, "sd_sfd: run --steps steps with optim.precision fp32 and "
                  "fp16_emulated from the same start and report how far they diverge.")
flags.DEFINE_bool("json", False, "Print the result as one JSON object on the last line.")
FLAGS = flags.FLAGS

from sfd_jax.perf import compiled_flops, measure


def bench(config, mode: str, batch: int, steps: int, peak_tflops: float | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sfd_jax.sfd.state import PretrainState, SFDState, make_optimizer
    from sfd_jax.train_loop import Trainer

    config.mode = mode
    config.training.batch_size = batch
    import tempfile
    tr = Trainer(config, tempfile.mkdtemp(prefix="sfd_bench_"))   # nothing is written to it
    shapes, p_sh = tr._param_shardings()
    init = jax.jit(tr.model.init_params, out_shardings=p_sh)
    params = init(jax.random.key(0))
    copy = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=p_sh)
    step0 = jax.device_put(jnp.int32(0), tr.repl)
    if mode == "sfd":
        txs = (make_optimizer(config.g_optim, "value"), make_optimizer(config.sg_optim, "value"))
        g_opt, g_sh = tr._opt_init(txs[0], params, p_sh)
        sg_opt, sg_sh = tr._opt_init(txs[1], params, p_sh)
        state = SFDState(step=step0, generator=copy(params), generator_ema=copy(params), fake_score=copy(params),
                         g_opt=g_opt, sg_opt=sg_opt)
        sh = SFDState(step=tr.repl, generator=p_sh, generator_ema=p_sh, fake_score=p_sh, g_opt=g_sh, sg_opt=sg_sh)
        args = (params,)
    else:
        txs = (make_optimizer(config.optim, "global_norm"),)
        opt, opt_sh = tr._opt_init(txs[0], params, p_sh)
        state = PretrainState(step=step0, params=copy(params), ema=copy(params), opt=opt)
        sh = PretrainState(step=tr.repl, params=p_sh, ema=p_sh, opt=opt_sh)
        res, ch = config.data.image_size, config.model.in_channels
        images = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (batch, res, res, ch)).astype(np.float32),
                                tr.batch_sharding)
        labels = jax.device_put(np.arange(batch, dtype=np.int32) % config.data.n_classes, tr.batch_sharding)
        args = (images, labels)
    step_fn = tr.make_step(sh, txs)

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, *args, tr.root_key).compile()
    compile_s = time.perf_counter() - t0
    r = measure(compiled, state, lambda i: (*args, tr.root_key), steps, batch=batch, dtype=config.dtype,
                flops=compiled_flops(compiled), peak_tflops=peak_tflops)
    return {"mode": mode, "batch": batch, "dtype": config.dtype, "mesh": dict(tr.mesh.shape),
            "compile_s": compile_s, **r, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv):
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None:
        raise UsageError("--config is required (configs/<recipe>.py)")
    mode = FLAGS.mode or FLAGS.config.mode
    if mode == "sd_sfd":
        return _main_sd()
    if mode not in ("sfd", "pretrain"):
        raise UsageError(f"--mode must be sfd, pretrain or sd_sfd, got {mode!r}")
    if mode == "pretrain" and "optim" not in FLAGS.config:
        raise UsageError("pretrain mode needs a *_train.py config (it has no optim section)")
    if mode == "sfd" and "distill" not in FLAGS.config:
        raise UsageError("sfd mode needs a distillation config (it has no distill section)")
    batch = FLAGS.batch or int(FLAGS.config.training.batch_size)
    _report(bench(FLAGS.config, mode, batch, FLAGS.steps, FLAGS.peak_tflops))


def _main_sd():
    from sfd_jax.bench_sd import bench_sd
    if FLAGS.sd_size not in ("tiny", "sd15", "model"):
        raise UsageError(f"--sd_size must be tiny, sd15 or model, got {FLAGS.sd_size!r}")
    batch = FLAGS.batch or int(FLAGS.config.training.batch)
    if FLAGS.compare_precision:
        from sfd_jax.bench_sd import compare_precisions
        r = compare_precisions(FLAGS.config, batch, FLAGS.steps, FLAGS.sd_size)
        for p in ("fp32", "fp16_emulated"):
            for row in r[p]:
                print(f"{p:>14} step {row['step']}: |dG|/|G| {row['g_rel_change']:.3e}, "
                      f"|dF|/|F| {row['fake_rel_change']:.3e}, G loss {row['g_remain_loss']:.4g}")
        print(f"generator change fp16_emulated / fp32: {r['g_change_ratio_fp16_over_fp32']:.3g}; distance between "
              f"the two generators / fp32 change: {r['g_distance_over_fp32_change']:.3g}")
        if FLAGS.json:
            print(json.dumps(r))
        return
    _report(bench_sd(FLAGS.config, batch, FLAGS.steps, FLAGS.sd_size, FLAGS.peak_tflops))


def _report(r: dict) -> None:
    batch = r["batch"]
    fmt = lambda v, f: "n/a" if v is None else f.format(v)  # noqa: E731
    extra = (f", {r['sd_size']} components at {r['resolution']} px, micro-batch {r['micro_batch']} x "
             f"{r['rounds']} rounds" if r["mode"] == "sd_sfd" else "")
    print(f"{r['mode']} step, batch {batch}, {r['dtype']}, {r['devices']} x {r['device_kind']} (mesh {r['mesh']})"
          + extra)
    print(f"  {r['step_ms']:.1f} ms/step (min {r['step_ms_min']:.1f}), {r['images_per_s']:.3f} images/s, "
          f"compile {r['compile_s']:.1f} s")
    print(f"  {fmt(r['flops_per_image'] and r['flops_per_image'] / 1e9, '{:.1f}')} GFLOP/image, "
          f"{fmt(r['achieved_tflops'], '{:.3f}')} TFLOP/s achieved, MFU {fmt(r['mfu'], '{:.1%}')} "
          f"(peak {fmt(r['peak_tflops_per_device'], '{:.0f}')} TFLOP/s/device)")
    print(f"  peak device memory {fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 2**30, '{:.2f}')} GiB, "
          f"host RSS {r['host_peak_rss_bytes'] / 2**30:.2f} GiB")
    if FLAGS.json:
        print(json.dumps(r))
    sys.stdout.flush()


def cli():
    run(main, "sfd_jax.bench")


if __name__ == "__main__":
    cli()
