"""Shared pieces of the benchmarks: per-device peak FLOP/s and XLA's FLOP count of a compiled step."""
from __future__ import annotations


# Dense peak TFLOP/s per device: (bf16, fp32). fp32 on NVIDIA counts TF32 tensor cores (XLA's default precision).
PEAK_TFLOPS = {
    "H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0), "L4": (121.0, 60.0),
    "TPU v4": (275.0, 275.0), "TPU v5 lite": (197.0, 197.0), "TPU v5e": (197.0, 197.0), "TPU v5p": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0), "TPU v6e": (918.0, 918.0),
}


def peak_for(device_kind: str, dtype: str) -> float | None:
    for key, (bf16, fp32) in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def compiled_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def measure(compiled, state, args_for_step, steps: int, *, batch: int, dtype: str, flops: float | None,
            peak_tflops: float | None = None) -> dict:
    """Warm up, then time ``steps`` calls ``state, metrics = compiled(state, *args_for_step(i))`` (blocking on
    each; argument preparation is not timed). Returns ms/step, images/s, FLOPs per image, achieved TFLOP/s, MFU
    against ``peak_tflops`` (default: :func:`peak_for` the device), peak device memory (on CPU: XLA's buffer
    plan of ``compiled``), host peak RSS and the last step's metrics."""
    import resource
    import time

    import jax
    import numpy as np

    state, m = compiled(state, *args_for_step(0))
    jax.block_until_ready((state, m))
    times = []
    for i in range(steps):
        args = args_for_step(i + 1)
        t0 = time.perf_counter()
        state, m = compiled(state, *args)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    dev = jax.devices()[0]
    n_dev = jax.device_count()
    peak = peak_tflops if peak_tflops is not None else peak_for(dev.device_kind, dtype)
    achieved = flops / step_s if flops else None   # flops of the whole (global) step
    stats = dev.memory_stats() or {}
    out = {
        "devices": n_dev, "device_kind": dev.device_kind, "step_ms": 1000 * step_s,
        "step_ms_min": 1000 * min(times), "images_per_s": batch / step_s,
        "flops_per_image": flops / batch if flops else None,
        "achieved_tflops": achieved / 1e12 if achieved else None, "peak_tflops_per_device": peak,
        "mfu": (achieved / (peak * 1e12 * n_dev)) if (achieved and peak) else None,
        "peak_memory_bytes": stats.get("peak_bytes_in_use"),
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "losses": {k: float(v) for k, v in m.items()},
    }
    if out["peak_memory_bytes"] is None:   # CPU: no allocator statistics; report XLA's buffer plan instead
        try:
            ma = compiled.memory_analysis()
            out["peak_memory_bytes"] = int(ma.temp_size_in_bytes + ma.argument_size_in_bytes
                                           + ma.output_size_in_bytes - ma.alias_size_in_bytes)
        except Exception:  # noqa: BLE001
            pass
    return out


# XLA:CPU flags measured to be faster for the DDPM UNet (python -m sfd_jax.bench --compare=torch; the numbers are in
# the commit that set them). jax 0.10's XLA:CPU hands convolutions, reductions and some elementwise fusions to
# YNNPACK by default; its convolutions were slower than XLA's own (Eigen) ones for every UNet shape we timed, and
# much slower for the demo's small 8x8 / 4x4 maps. An empty fusion-type list turns the YNNPACK fusions off.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def apply_cpu_xla_flags(environ=None) -> str:
    """Append :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS`` (each one unless the variable already sets that flag) and
    return the result. They only change XLA:CPU compilation (GPU/TPU ignore them), and take effect only before JAX
    creates its backends, so call this first thing in an entry point. ``SFD_JAX_NO_CPU_FLAGS=1`` opts out."""
    import os
    env = os.environ if environ is None else environ
    current = env.get("XLA_FLAGS", "")
    if env.get("SFD_JAX_NO_CPU_FLAGS", "") not in ("", "0"):
        return current
    extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in current]
    if extra:
        env["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return env.get("XLA_FLAGS", "")
