r"""Time the real jitted train step: images/s, ms/step, FLOPs per image (XLA cost analysis), MFU, memory.

  python -m sfd_jax.bench --config=configs/cifar10_sfd.py --batch=8 --steps=3
  python -m sfd_jax.bench --config=configs/cifar10_train.py --batch=128 --json --config.dtype=bfloat16
  python -m sfd_jax.bench --config=configs/sd15_celebrity.py --sd_size=sd15 --batch=8   # SD step, see bench_sd
  python -m sfd_jax.bench --config=configs/cifar10_sfd.py --batch=8 --steps=3 --compare=torch
  python -m sfd_jax.bench --config=configs/cifar10_train.py --batch=8 --steps=3 --compare=torch --mode=pretrain
  python -m sfd_jax.bench --config=configs/cifar10_train.py --pieces   # forward+backward of each UNet piece, vs PyTorch

Weights are random (no checkpoint or data needed); the step, shardings and donation are exactly the training
ones. ``--compare=torch`` times the same iteration written in PyTorch (:mod:`sfd_jax.ddpm.torch_bench`) in the same
process, alternating steps, and prints both images/s, the ratio and each framework's threads. Timing starts after compilation and blocks on the results of every step. With ``--json`` the last line is
one JSON object.
"""
from __future__ import annotations

import json
import sys

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
flags.DEFINE_bool("pieces", False, "Time forward + backward of the DDPM UNet's pieces (3x3 conv, GroupNorm + swish, "
                  "ResnetBlock, AttnBlock) at each of its feature-map shapes, in JAX and in PyTorch side by side "
                  "(sfd_jax.ddpm.bench_pieces; batch: --batch, default 8).")
flags.DEFINE_bool("json", False, "Print the result as one JSON object on the last line.")
FLAGS = flags.FLAGS

from sfd_jax.ddpm.bench import bench, compare_torch  # noqa: E402


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
    if FLAGS.pieces:
        return _report_pieces()
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
        if mode == "sfd" and not isinstance(FLAGS.config.distill.label_to_forget, int):
            raise UsageError("--compare=torch times one forgotten class (the original's iteration); got "
                             f"distill.label_to_forget={FLAGS.config.distill.label_to_forget!r}")
        return _report_compare(compare_torch(FLAGS.config, mode, batch, FLAGS.steps))
    _report(bench(FLAGS.config, mode, batch, FLAGS.steps, FLAGS.peak_tflops))


def _report_pieces() -> None:
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        raise UsageError("--pieces needs PyTorch (pip install torch)")
    if "model" not in FLAGS.config or "ch_mult" not in FLAGS.config.model:
        raise UsageError("--pieces times the DDPM UNet: give a DDPM config (configs/cifar10_*.py)")
    from sfd_jax.ddpm.bench_pieces import shapes_of, time_pieces
    batch = FLAGS.batch or 8
    rows = time_pieces(shapes_of(FLAGS.config), batch=batch, repeats=max(FLAGS.steps, 1),
                       emb_dim=8 * int(FLAGS.config.model.ch))
    print(f"forward + backward, batch {batch}, fp32, median of {max(FLAGS.steps, 1)} (ms; ratio = PyTorch / sfd_jax)")
    print("| map | piece | sfd_jax ms | PyTorch ms | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['piece']} | {r['jax_ms']:.1f} | {r['torch_ms']:.1f} | "
              f"{r['torch_ms'] / r['jax_ms']:.2f}x |")
    if FLAGS.json:
        print(json.dumps(rows))
    sys.stdout.flush()


def _main_sd():
    from sfd_jax.sd.bench import bench_sd
    if FLAGS.sd_size not in ("tiny", "sd15", "model"):
        raise UsageError(f"--sd_size must be tiny, sd15 or model, got {FLAGS.sd_size!r}")
    batch = FLAGS.batch or int(FLAGS.config.training.batch)
    if FLAGS.compare_precision:
        from sfd_jax.sd.bench import compare_precisions
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
