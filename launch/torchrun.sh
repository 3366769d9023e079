#!/usr/bin/env bash
# Megatron distillation on one node: torchrun, one process per GPU, every setting from one run config file.
#
#   launch/torchrun.sh run.yaml [--flag value ...]      # flags override the file, as for `m2d distill`
#
# Environment:
#   NPROC        processes (default: the GPUs nvidia-smi lists; 1 on a machine without GPUs)
#   PLAN_CHECK   1: print `m2d plan` for this run first and stop if it does not fit (default 0)
#   M2D_ENTRY    the module torchrun runs (default megatron_m2d.distillation.megatron; tests point it at a
#                wrapper that applies their CPU patches)
# Rerunning the same command resumes from the newest complete checkpoint in the run's `out` directory.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: launch/torchrun.sh RUN_CONFIG [--flag value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
if [[ ! -f "$CONFIG" ]]; then
  echo "launch: error: run config $CONFIG not found" >&2
  exit 2
fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ "$NPROC" -ge 1 ]] || NPROC=1
fi
PYTHON=${PYTHON:-python}
if [[ "${PLAN_CHECK:-0}" == 1 ]]; then
  "$PYTHON" -m megatron_m2d plan --config "$CONFIG" --gpus "$NPROC" --strict "$@"
fi
# --standalone: a rendezvous on this host at a free port, so two runs on one node do not collide
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" \
  -m "${M2D_ENTRY:-megatron_m2d.distillation.megatron}" --config "$CONFIG" "$@"
