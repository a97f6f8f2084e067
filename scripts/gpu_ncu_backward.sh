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
  name=${path}_d${D}_n$N
  PYTHONPATH=/tmp/jca_exp/tree/site timeout 240 ncu --clock-control none --set detailed \
      --kernel-name regex:"$regex" --launch-skip 1 --launch-count 1 -f -o "$OUT/$name" \
      $PY -P "$REPO/benchmarks/profile_kernels.py" "$D" "$path" "$N" > "$OUT/$name.log" 2>&1
  echo "ncu $name rc=$?"
  ncu --import "$OUT/$name.ncu-rep" --page details > "$OUT/${name}_details.txt" 2>&1
  ncu --import "$OUT/$name.ncu-rep" --page raw --csv 2>&1 | gzip > "$OUT/${name}_raw.csv.gz"
  grep -E "Duration|SM Frequency|Throughput|Hit Rate" "$OUT/${name}_details.txt" | head -12
  rm -f "$OUT/$name.ncu-rep"
done
