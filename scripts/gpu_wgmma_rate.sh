#!/usr/bin/env bash
# benchmarks/wgmma_rate.cu and benchmarks/bwd_schedule_lab.cu on the GPU machine: build them
# against the CUTLASS headers of the nvidia-cutlass wheel (from .wheels/, carry that folder), run
# each twice while sampling the SM clock. Usage: scripts/gpu_wgmma_rate.sh OUTDIR
# (writes wgmma_rate.jsonl and schedule_lab.jsonl, both rounds each, and clocks.txt)
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_wgmma_rate.sh OUTDIR}")
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
if ls "$REPO"/.wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index "$REPO"/.wheels/*.whl 2>&1 | tail -2
fi
CUT=$($PY "$REPO/scripts/cutlass_include_dir.py")
[ -f "$CUT/cute/tensor.hpp" ] || { echo "gpu_wgmma_rate: no CUTLASS headers (nvidia-cutlass)" >&2; exit 1; }
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
for prog in wgmma_rate bwd_schedule_lab; do
  "$NVCC" -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -I"$CUT" -I"$REPO/cuda" \
    "$REPO/benchmarks/$prog.cu" -o "$OUT/$prog" || exit 1
done
nvidia-smi --query-gpu=clocks.sm --format=csv,noheader -lms 200 > "$OUT/clocks.txt" &
smi=$!
for round in 1 2; do
  "$OUT/wgmma_rate" | tee -a "$OUT/wgmma_rate.jsonl"
  "$OUT/bwd_schedule_lab" | tee -a "$OUT/schedule_lab.jsonl"
done
kill $smi 2>/dev/null
rm -f "$OUT/wgmma_rate" "$OUT/bwd_schedule_lab"
echo "SM clock samples (count, clock):"; sort "$OUT/clocks.txt" | uniq -c | sort -rn | head -5
