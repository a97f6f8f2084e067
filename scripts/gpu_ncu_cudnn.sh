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
cd /tmp
for D in $DIMS; do
  # the warm-up call's kernels are skipped: 2 (fprop, bprop) per step
  PYTHONPATH=$REPO timeout 240 ncu --clock-control none --set detailed \
      --kernel-name regex:"$REGEX" --launch-skip 2 --launch-count 2 -f -o "$OUT/cudnn_d$D" \
      $PY -P "$REPO/benchmarks/profile_kernels.py" "$D" cudnn > "$OUT/cudnn_d$D.log" 2>&1
  echo "ncu D=$D rc=$?"
  ncu --import "$OUT/cudnn_d$D.ncu-rep" --page details > "$OUT/cudnn_d${D}_details.txt" 2>&1
  ncu --import "$OUT/cudnn_d$D.ncu-rep" --page raw --csv > "$OUT/cudnn_d${D}_raw.csv" 2>&1
  gzip -f "$OUT/cudnn_d${D}_raw.csv"
  grep -E "cudnn_generated|Duration|Registers Per|Block Size|Grid Size|Shared Memory Config|Dynamic Shared|Static Shared|Achieved Occupancy|Theoretical Occupancy|Block Limit|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|Waves Per SM|Threads" \
      "$OUT/cudnn_d${D}_details.txt" | head -60
  rm -f "$OUT/cudnn_d$D.ncu-rep"
done
