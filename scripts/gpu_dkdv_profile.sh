#!/usr/bin/env bash
# Build + install, then ncu (SpeedOfLight, MemoryWorkloadAnalysis, WarpStateStats,
# ComputeWorkloadAnalysis) of the dK/dV kernel of one fwd+bwd step, once per raw-kernel path of
# bench.py: "kernel" (the plain dK/dV kernel of the two-kernel backward) and "kernel_fused" (the
# opt-in fused-dQ one). Where does the fused kernel's time go: tensor pipe, shared memory, L2
# reductions, or barrier waits? Usage: scripts/gpu_dkdv_profile.sh OUTDIR [D]
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_dkdv_profile.sh OUTDIR [D]}")
D=${2:-128}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT" || exit 1
cd /tmp
for path in kernel kernel_fused; do
  ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section ComputeWorkloadAnalysis --kernel-name regex:bwd_dkdv \
      --launch-skip 1 --launch-count 1 -f -o "$OUT/$path" \
      $PY -P "$REPO/benchmarks/profile_op.py" "$path" "$D" --iters 2 > "$OUT/$path.log" 2>&1
  echo "ncu $path rc=$?"
  ncu --import "$OUT/$path.ncu-rep" --page details --csv > "$OUT/${path}_details.csv" 2>&1
  ncu --import "$OUT/$path.ncu-rep" --page raw --csv > "$OUT/${path}_raw.csv" 2>&1
  rm -f "$OUT/$path.ncu-rep"
done
