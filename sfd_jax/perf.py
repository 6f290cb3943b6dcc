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
