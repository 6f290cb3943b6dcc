#!/usr/bin/env bash
# Run sfd_jax on a Cloud TPU VM slice: every worker runs the same program; JAX finds its peers itself.
#
#   launch/tpu_vm.sh create   NAME ZONE ACCELERATOR [VERSION]   # e.g. v5litepod-16 v2-alpha-tpuv5-lite
#   launch/tpu_vm.sh setup    NAME ZONE                         # copy this repo to all workers, pip install
#   launch/tpu_vm.sh run      NAME ZONE -- ARGS...              # python -m sfd_jax.train ARGS on all workers
#   launch/tpu_vm.sh teardown NAME ZONE
# Add --dry-run before the command to print the gcloud commands instead of running them.
# Use a gs:// --workdir so every worker writes its checkpoint shards to the same place.
set -euo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
go() { if (( DRY )); then printf '%q ' "$@"; echo; else "$@"; fi; }
cmd=${1:?command: create|setup|run|teardown}; name=${2:?TPU name}; zone=${3:?zone}; shift 3
ssh_all() { go gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }
case "$cmd" in
  create)   go gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "${1:?accelerator}" \
              --version "${2:-tpu-ubuntu2204-base}" ;;
  setup)    go gcloud compute tpus tpu-vm scp --recurse "$(cd "$(dirname "$0")/.." && pwd)" "$name:~/sfd_jax" \
              --zone "$zone" --worker=all
            ssh_all "cd ~/sfd_jax && pip install -U 'jax[tpu]' && pip install -e ." ;;
  run)      [[ "${1:-}" == "--" ]] && shift
            ssh_all "cd ~/sfd_jax && SFD_DISTRIBUTED=1 python -m sfd_jax.train $(printf '%q ' "$@")" ;;
  teardown) go gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
