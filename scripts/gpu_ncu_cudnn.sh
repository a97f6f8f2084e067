#!/usr/bin/env bash
# ncu `--set detailed` of cuDNN's flash-attention kernels (the benchmark's baseline) on one
# fwd+bwd step, B=4 H=16 N=4096, for each head dim: launch configuration (registers, threads,
# shared memory, grid), occupancy, pipe use and memory traffic of the kernel that beats our
# backward. Needs no build of ours. Usage: scripts/gpu_ncu_cudnn.sh OUTDIR [REGEX] [DIMS]
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_ncu_cudnn.sh OUTDIR [REGEX] [DIMS]}")
REGEX=${2:-sdpa}
DIMS=${3:-128 64}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY="cudnn_generated|Duration|Registers Per|Block Size|Grid Size|Shared Memory Config|Dynamic \
Shared|Achieved Occupancy|Theoretical Occupancy|Block Limit|Compute \(SM\) Throughput|Memory \
Throughput|L2 Cache Throughput|Waves Per SM|Threads"
cd /tmp
for D in $DIMS; do
  # the warm-up call's kernels are skipped: 2 (fprop, bprop) per step
  PYTHONPATH=$REPO bash "$REPO/scripts/ncu_profile.sh" "$OUT" "cudnn_d$D" "$REGEX" 2 2 \
      "$SUMMARY" -- $PY -P "$REPO/benchmarks/profile_kernels.py" "$D" cudnn
done
