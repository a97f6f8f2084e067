#!/usr/bin/env bash
# Ring attention on real GPUs: equality checks on all visible devices (f32 -> XLA block path,
# bf16 -> CUDA kernel blocks), then the scaling benchmark. Logs and JSON go to OUTDIR.
# The package must already be installed (pip install --no-build-isolation --no-deps .).
# Usage: scripts/gpu_ring_check.sh OUTDIR [ring_scaling.py args]
# Env: JCA_SKIP_RING_TESTS=1, JCA_SKIP_RING_BENCH=1.
# To split the benchmark over several commands (each under the time limit), pass e.g.
# "--devices 1 2" first, then JCA_SKIP_RING_TESTS=1 ... OUTDIR --devices 4 --append.
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_ring_check.sh OUTDIR [bench args]}")
shift || true
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
cd /tmp  # never import the source tree (it has no .so): run from outside the repo root, with -P

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -P -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  $PY -P -c "from jax_cosine_attention import _cuda as c; print('ext', c.AVAILABLE, c.IMPORT_ERROR, c.__file__)"
} 2>&1 | tee "$OUT/ring_env.txt"

if [ "${JCA_SKIP_RING_TESTS:-0}" != 1 ]; then
  echo "== ring equality checks (f32, XLA path)"
  $PY -P "$REPO/tests/ring_check.py" --dtype float32 --seq 512 --heads 4 --head-dim 32 \
      --xla-blocks 64 --assert-tol 1e-4 > "$OUT/ring_check_f32.json" 2> "$OUT/ring_check_f32.log"
  rc=$?; grep -E "^(ok|FAIL)|ring_check:" "$OUT/ring_check_f32.log"; [ $rc -eq 0 ] || { tail -20 "$OUT/ring_check_f32.log"; status=1; }
  echo "== ring equality checks (bf16, CUDA kernel blocks)"
  $PY -P "$REPO/tests/ring_check.py" --dtype bfloat16 --seq 2048 --heads 8 --head-dim 64 \
      --xla-blocks 0 --assert-tol 3e-2 --require-kernel > "$OUT/ring_check_bf16.json" 2> "$OUT/ring_check_bf16.log"
  rc=$?; grep -E "^(ok|FAIL)|ring_check:" "$OUT/ring_check_bf16.log"; [ $rc -eq 0 ] || { tail -20 "$OUT/ring_check_bf16.log"; status=1; }
fi

if [ "${JCA_SKIP_RING_BENCH:-0}" != 1 ]; then
  echo "== ring scaling benchmark"
  $PY -P "$REPO/benchmarks/ring_scaling.py" --out-json "$OUT/ring_scaling.json" \
      --out-md "$OUT/ring_scaling.md" "$@" 2> "$OUT/ring_scaling.log"
  [ $? -eq 0 ] || { tail -30 "$OUT/ring_scaling.log"; status=1; }
fi
exit $status
