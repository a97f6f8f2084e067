#!/usr/bin/env bash
# ncu `--set detailed` of one backward kernel per path at one size, all in one device call:
# our plain dK/dV kernel, our opt-in fused-dQ (5-product) dK/dV kernel and cuDNN's flash bprop,
# to place the 5-product backward's gap to cuDNN's. Builds the tree first (gpu_experiments.sh).
# Usage: scripts/gpu_ncu_backward.sh OUTDIR [D] [N] [PATHS]   (PATHS default: "fused cudnn plain")
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_ncu_backward.sh OUTDIR [D] [N] [PATHS]}")
D=${2:-128}; N=${3:-16384}; PATHS=${4:-fused cudnn plain}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
JCA_EXP_ROUNDS=0 bash "$REPO/scripts/gpu_experiments.sh" "$OUT" tree | tail -3
cd /tmp
for path in $PATHS; do
  regex=dkdv_kernel; [ "$path" = cudnn ] && regex=flash_bprop
  PYTHONPATH=/tmp/jca_exp/tree/site bash "$REPO/scripts/ncu_profile.sh" "$OUT" \
      "${path}_d${D}_n$N" "$regex" 1 1 "Duration|SM Frequency|Throughput|Hit Rate" \
      -- $PY -P "$REPO/benchmarks/profile_kernels.py" "$D" "$path" "$N"
done
