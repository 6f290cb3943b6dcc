r"""Time the real jitted train step: images/s, ms/step, FLOPs per image (XLA cost analysis), MFU, memory.

  python -m sfd_jax.bench --config=configs/cifar10_sfd.py --batch=8 --steps=3
  python -m sfd_jax.bench --config=configs/cifar10_train.py --batch=128 --json --config.dtype=bfloat16
  python -m sfd_jax.bench --config=configs/sd15_celebrity.py --sd_size=sd15 --batch=8   # SD step, see bench_sd
  python -m sfd_jax.bench --config=configs/cifar10_sfd.py --batch=8 --steps=3 --compare=torch
  python -m sfd_jax.bench --config=configs/cifar10_train.py --batch=8 --steps=3 --compare=torch --mode=pretrain

Weights are random (no checkpoint or data needed); the step, shardings and donation are exactly the training
ones. ``--compare=torch`` times the same iteration written in PyTorch (:mod:`sfd_jax.bench_torch`) in the same
process, alternating steps, and prints both images/s, the ratio and each framework's threads. Timing starts after compilation and blocks on the results of every step. With ``--json`` the last line is
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
flags.DEFINE_string("compare", None, "torch: also time the same iteration in PyTorch (same architecture and "
                    "batch, interleaved in this process) and print both images/s and the ratio (sfd / pretrain).")
flags.DEFINE_bool("json", False, "Print the result as one JSON object on the last line.")
FLAGS = flags.FLAGS

from sfd_jax.perf import apply_cpu_xla_flags, compiled_flops, measure


def _setup(config, mode: str, batch: int):
    """The training step exactly as the trainer builds it (mesh, shardings, donation), on random weights:
    (jitted step, state, extra step args, root key, the model, alphas_cumprod, mesh)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sfd_jax import diffusion, parallel
    from sfd_jax.models.ddpm_unet import ConditionalUNet
    from sfd_jax.sfd.state import PretrainState, SFDState, make_optimizer

    config.mode = mode
    config.training.batch_size = batch
    mesh = parallel.mesh_from_config(config)
    if batch % parallel.batch_divisor(mesh):
        raise UsageError(f"--batch={batch} is not divisible by the {parallel.batch_divisor(mesh)} batch shards")
    bsh, repl, min_size = parallel.batch_sharding(mesh), parallel.replicated(mesh), parallel.fsdp_min_size(config)
    model = ConditionalUNet.from_config(config)
    _, ac = diffusion.schedule_from_config(config)
    root_key = jax.random.key(int(config.seed))
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0)))
    p_sh = parallel.state_shardings(shapes, mesh, min_size)
    params = jax.jit(model.init_params, out_shardings=p_sh)(jax.random.key(0))
    copy = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=p_sh)

    def opt_init(tx, p):
        opt_sh = parallel.state_shardings(jax.eval_shape(tx.init, p), mesh, min_size)
        return jax.jit(tx.init, in_shardings=(p_sh,), out_shardings=opt_sh)(p), opt_sh

    step0 = jax.device_put(jnp.int32(0), repl)
    if mode == "sfd":
        from sfd_jax.sfd.ddpm_task import DDPMTask
        from sfd_jax.sfd.step import make_sfd_step
        task = DDPMTask.from_config(config)
        if task.uses_classifier:
            raise UsageError("the bench runs on random weights: pick a config without a classifier "
                             "(distill.pseudo_label_type 'rand' or a label_to_override)")
        g_tx, sg_tx = make_optimizer(config.g_optim, "value"), make_optimizer(config.sg_optim, "value")
        g_opt, g_sh = opt_init(g_tx, params)
        sg_opt, sg_sh = opt_init(sg_tx, params)
        state = SFDState(step=step0, generator=copy(params), generator_ema=copy(params), fake_score=copy(params),
                         g_opt=g_opt, sg_opt=sg_opt)
        sh = SFDState(step=repl, generator=p_sh, generator_ema=p_sh, fake_score=p_sh, g_opt=g_sh, sg_opt=sg_sh)
        fn = make_sfd_step(model, config, task, ac, g_tx, sg_tx, batch_size=batch, batch_sharding=bsh,
                           fused=bool(config.distill.get("fused", True)))
        step_fn = jax.jit(fn, in_shardings=(sh, p_sh, repl), out_shardings=(sh, repl), donate_argnums=(0,))
        args = (params,)
    else:
        from sfd_jax.sfd.step import make_pretrain_step
        tx = make_optimizer(config.optim, "global_norm")
        opt, opt_sh = opt_init(tx, params)
        state = PretrainState(step=step0, params=copy(params), ema=copy(params), opt=opt)
        sh = PretrainState(step=repl, params=p_sh, ema=p_sh, opt=opt_sh)
        res, ch = config.data.image_size, config.model.in_channels
        images = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (batch, res, res, ch)).astype(np.float32),
                                bsh)
        labels = jax.device_put(np.arange(batch, dtype=np.int32) % config.data.n_classes, bsh)
        fn = make_pretrain_step(model, config, ac, tx, batch_sharding=bsh)
        step_fn = jax.jit(fn, in_shardings=(sh, bsh, bsh, repl), out_shardings=(sh, repl), donate_argnums=(0,))
        args = (images, labels)
    return step_fn, state, args, root_key, model, ac, mesh


def jax_threads(config) -> dict:
    """What XLA:CPU runs on: its intra-op pool has one thread per schedulable core (tsl MaxParallelism)."""
    import jax
    from sfd_jax.models.conv import resolve
    return {"cpus_schedulable": len(os.sched_getaffinity(0)), "backend": jax.default_backend(),
            "conv_impl": resolve(config.model.get("conv_impl", "auto")), "xla_flags": os.environ.get("XLA_FLAGS", ""), "version": jax.__version__}


def bench(config, mode: str, batch: int, steps: int, peak_tflops: float | None = None) -> dict:
    step_fn, state, args, root_key, _, _, mesh = _setup(config, mode, batch)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, *args, root_key).compile()
    compile_s = time.perf_counter() - t0
    r = measure(compiled, state, lambda i: (*args, root_key), steps, batch=batch, dtype=config.dtype,
                flops=compiled_flops(compiled), peak_tflops=peak_tflops)
    return {"mode": mode, "batch": batch, "dtype": config.dtype, "mesh": dict(mesh.shape),
            "compile_s": compile_s, **r, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def compare_torch(config, mode: str, batch: int, steps: int) -> dict:
    """The JAX step and the same iteration in PyTorch (:mod:`sfd_jax.bench_torch`), same architecture and batch,
    timed in this process: one untimed warm-up step each (after JAX's compile), then ``steps`` timed steps
    alternating JAX, PyTorch, JAX, ... (each blocking until its results are ready); medians."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("--compare=torch needs PyTorch (pip install torch)") from None
    import jax
    import numpy as np

    from sfd_jax import bench_torch

    if config.dtype != "float32":
        raise UsageError("--compare=torch compares float32 steps (--config.dtype=float32)")
    step_fn, state, args, root_key, _, ac, mesh = _setup(config, mode, batch)
    if jax.device_count() != 1:
        raise UsageError("--compare=torch times one device (the PyTorch side runs on the host CPU)")
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, *args, root_key).compile()
    compile_s = time.perf_counter() - t0
    flops = compiled_flops(compiled)
    it = (bench_torch.TorchSFDIteration if mode == "sfd" else bench_torch.TorchPretrainIteration)(config, ac, batch)
    state, m = compiled(state, *args, root_key)
    jax.block_until_ready((state, m))
    it.step()
    tj, tt = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, *args, root_key)
        jax.block_until_ready((state, m))
        tj.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        it.step()
        tt.append(time.perf_counter() - t0)
    sj, st = float(np.median(tj)), float(np.median(tt))
    return {"mode": mode, "batch": batch, "dtype": config.dtype, "steps": steps, "compile_s": compile_s,
            "flops_per_image": flops / batch if flops else None,
            "jax": {"step_ms": 1e3 * sj, "step_ms_all": [1e3 * v for v in tj], "images_per_s": batch / sj,
                    "threads": jax_threads(config), "losses": {k: float(v) for k, v in m.items()}},
            "torch": {"step_ms": 1e3 * st, "step_ms_all": [1e3 * v for v in tt], "images_per_s": batch / st,
                      "threads": bench_torch.threads(), "fused": bool(config.distill.get("fused", True))
                      if mode == "sfd" else None},
            "ratio_jax_over_torch": st / sj, "mesh": dict(mesh.shape)}


def _report_compare(r: dict) -> None:
    j, t = r["jax"], r["torch"]
    print(f"{r['mode']} step, batch {r['batch']}, {r['dtype']}, {r['steps']} timed steps each, interleaved "
          f"(JAX compile {r['compile_s']:.1f} s)")
    print(f"  sfd_jax : {j['step_ms']:9.1f} ms/step  {j['images_per_s']:.3f} images/s   threads: XLA:CPU pool of "
          f"{j['threads']['cpus_schedulable']} (conv_impl {j['threads']['conv_impl']}, "
          f"XLA_FLAGS={j['threads']['xla_flags']!r})")
    print(f"  PyTorch : {t['step_ms']:9.1f} ms/step  {t['images_per_s']:.3f} images/s   threads: intra-op "
          f"{t['threads']['intra_op']}, inter-op {t['threads']['inter_op']} (torch {t['threads']['version']}, "
          f"oneDNN {'on' if t['threads']['mkldnn'] else 'off'})")
    print(f"  ratio sfd_jax / PyTorch images/s: {r['ratio_jax_over_torch']:.2f}x")
    if r["flops_per_image"]:
        print(f"  {r['flops_per_image'] / 1e9:.1f} GFLOP/image (XLA cost analysis): sfd_jax "
              f"{r['flops_per_image'] * j['images_per_s'] / 1e9:.1f} GFLOP/s, PyTorch "
              f"{r['flops_per_image'] * t['images_per_s'] / 1e9:.1f} GFLOP/s")
    if FLAGS.json:
        print(json.dumps(r))
    sys.stdout.flush()


def main(argv):
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None:
        raise UsageError("--config is required (configs/<recipe>.py)")
    apply_cpu_xla_flags()   # before JAX creates its backends
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
    if FLAGS.compare:
        if FLAGS.compare != "torch":
            raise UsageError(f"--compare must be 'torch', got {FLAGS.compare!r}")
        return _report_compare(compare_torch(FLAGS.config, mode, batch, FLAGS.steps))
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
