#!/usr/bin/env bash
# Several GPU nodes, one process per node. Each process needs the coordinator address, the process count and
# its own id; under SLURM they come from the scheduler:
#
#   #SBATCH --nodes=4 --ntasks-per-node=1 --gpus-per-node=8
#   srun launch/cuda_multinode.sh --config=configs/cifar10_sfd.py --workdir=/shared/runs/x
#
# Elsewhere set COORDINATOR (host:port of process 0), NUM_PROCESSES and PROCESS_ID yourself.
# --dry-run prints the environment and the command.
set -euo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  COORDINATOR=${COORDINATOR:-$head:${COORDINATOR_PORT:-12355}}
  NUM_PROCESSES=${NUM_PROCESSES:-$SLURM_NTASKS}
  PROCESS_ID=${PROCESS_ID:-$SLURM_PROCID}
fi
: "${COORDINATOR:?set COORDINATOR=host:port (or run under SLURM)}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID}"
export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_PROCESSES JAX_PROCESS_ID=$PROCESS_ID
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
cmd=(python -m sfd_jax.train "$@")
if (( DRY )); then
  echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES JAX_PROCESS_ID=$JAX_PROCESS_ID"
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
