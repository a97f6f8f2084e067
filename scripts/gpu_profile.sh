#!/usr/bin/env bash
# Build + install (as gpu_check.sh, no tests), then ncu: per-kernel times of one public-op and one
# cuDNN fwd+bwd step, and the detailed sections of the sm_90a backward kernels.
# Usage: scripts/gpu_profile.sh OUTDIR [D]
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_profile.sh OUTDIR [D]}")
D=${2:-128}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT" || exit 1
cd /tmp
for path in cuda cudnn kernel; do
  for c in "" --causal; do
    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        $PY -P "$REPO/benchmarks/profile_op.py" $path $D $c --iters 2 \
        > "$OUT/times_${path}${c:+_causal}.csv" 2> "$OUT/times_${path}${c:+_causal}.err"
    echo "$path $c rc=$?"
  done
done
ncu --clock-control none --set detailed --section WarpStateStats --section SourceCounters \
    --kernel-name regex:"dkdv|dq_kernel" --launch-skip 2 --launch-count 2 \
    $PY -P "$REPO/benchmarks/profile_kernels.py" $D > "$OUT/detail_bwd.txt" 2>&1
echo "detail rc=$?"
