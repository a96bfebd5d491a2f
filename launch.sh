#!/usr/bin/env bash
# Launch a federated run: one torchrun rank per hospital.
#
#   ./launch.sh [train.py arguments...]                    # one node, NPROC ranks
#   sbatch --nodes=2 --ntasks-per-node=1 launch.sh ...     # SLURM: one torchrun per node
#
# Settings (environment, with defaults):
#   NPROC        ranks (hospitals) per node            default 3
#   MODE         local | slurm                          default: slurm inside a SLURM job, else local
#   RDZV_PORT    rendezvous port on the head node       default 29500
#   PYTHON       interpreter holding fedsim             default python3
#   MAX_RESTARTS torchrun restarts after a rank fails   default 0
#   FEDSIM_HOME  folder holding train.py                default: beside this script; under sbatch, which
#                                                       runs a copy of it, the submit directory
# Extra arguments go to train.py unchanged.
set -euo pipefail

NPROC="${NPROC:-3}"
RDZV_PORT="${RDZV_PORT:-29500}"
PYTHON="${PYTHON:-python3}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
if [[ -n "${SLURM_JOB_ID:-}" ]]; then MODE="${MODE:-slurm}"; else MODE="${MODE:-local}"; fi
HERE="${FEDSIM_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
if [[ -z "${FEDSIM_HOME:-}" && ! -f "$HERE/train.py" && -f "${SLURM_SUBMIT_DIR:-/nonexistent}/train.py" ]]; then
  HERE="$SLURM_SUBMIT_DIR"  # sbatch runs a copy of this script from its spool folder
fi
if [[ ! -f "$HERE/train.py" ]]; then
  echo "launch.sh: no train.py in $HERE; set FEDSIM_HOME to the fedsim folder (or submit from it)" >&2
  exit 2
fi

case "$MODE" in
  local)
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
      --max-restarts="$MAX_RESTARTS" "$HERE/train.py" "$@"
    ;;
  slurm)
    : "${SLURM_NNODES:?SLURM mode needs SLURM_NNODES (run inside sbatch/salloc)}"
    HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    # One srun task per node; torchrun on each node starts NPROC ranks and meets the others at the head node.
    exec srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
      "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC" \
      --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="${SLURM_JOB_ID}" \
      --max-restarts="$MAX_RESTARTS" "$HERE/train.py" "$@"
    ;;
  *)
    echo "launch.sh: MODE must be local or slurm, got '$MODE'" >&2
    exit 2
    ;;
esac
