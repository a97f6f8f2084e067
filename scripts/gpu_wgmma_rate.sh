#!/usr/bin/env bash
# benchmarks/wgmma_rate.cu on the GPU machine: build it against the CUTLASS headers of the
# nvidia-cutlass wheel (from .wheels/, carry that folder), run it twice while sampling the SM
# clock. Usage: scripts/gpu_wgmma_rate.sh OUTDIR   (writes wgmma_rate*.jsonl, clocks.txt)
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_wgmma_rate.sh OUTDIR}")
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
if ls "$REPO"/.wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index "$REPO"/.wheels/*.whl 2>&1 | tail -2
fi
CUT=$($PY -c "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include') if s else '')")
[ -f "$CUT/cute/tensor.hpp" ] || { echo "gpu_wgmma_rate: no CUTLASS headers (nvidia-cutlass)" >&2; exit 1; }
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
"$NVCC" -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -I"$CUT" -I"$REPO/cuda" \
  "$REPO/benchmarks/wgmma_rate.cu" -o "$OUT/wgmma_rate" || exit 1
nvidia-smi --query-gpu=clocks.sm --format=csv,noheader -lms 200 > "$OUT/clocks.txt" &
smi=$!
"$OUT/wgmma_rate" | tee "$OUT/wgmma_rate.jsonl"
"$OUT/wgmma_rate" > "$OUT/wgmma_rate_repeat.jsonl"
kill $smi 2>/dev/null
rm -f "$OUT/wgmma_rate"
echo "SM clock samples (count, clock):"; sort "$OUT/clocks.txt" | uniq -c | sort -rn | head -5
