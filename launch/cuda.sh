#!/usr/bin/env bash
# One node, all its GPUs, one process (JAX drives every local GPU; the mesh spans them).
#   launch/cuda.sh [--dry-run] --config=configs/cifar10_sfd.py --workdir=runs/x [--config.x.y=...]
# Install first: pip install -U "jax[cuda12]" && pip install -e .
set -euo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Latency-hiding scheduler: overlaps the FSDP all-gathers with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
cmd=(python -m sfd_jax.train "$@")
if (( DRY )); then echo "XLA_FLAGS=$XLA_FLAGS"; printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
