#!/usr/bin/env bash
# One GPU call for the fused l2norm: build + install (scripts/gpu_check.sh), the l2norm GPU tests
# (default rows per team, then the kernel tests again with JCA_L2NORM_ROWS=1 and 4), its
# benchmark per rows-per-team variant, the public op before/after (bench.py with
# JCA_FUSED_L2NORM=0 / 1), compute-sanitizer memcheck on the l2norm kernels, then the CPU oracle
# suite through the CUDA path (time-boxed). Usage: scripts/gpu_l2norm_check.sh OUTDIR
# (8 files land in OUTDIR: run.log, gpu_tests_l2norm.log, h/{env.txt,build.log}, bench JSON/MD).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_l2norm_check.sh OUTDIR}")
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG="$OUT/run.log"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*" | tee -a "$LOG"; }
TESTS="$REPO/tests/gpu/test_l2norm_kernels.py"
PYTEST=($PY -P -m pytest -q -p no:cacheprovider --rootdir /tmp)

stamp "build + install"
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 \
  timeout 300 bash "$REPO/scripts/gpu_check.sh" "$OUT/h" 2>&1 | tail -8 | tee -a "$LOG"
cd /tmp
stamp "GPU tests (l2norm)"
timeout 200 "${PYTEST[@]}" "$TESTS" --durations=5 2>&1 | tee "$OUT/gpu_tests_l2norm.log" | tail -15 | tee -a "$LOG"
for r in 1 4; do
  stamp "GPU kernel tests, JCA_L2NORM_ROWS=$r"
  JCA_L2NORM_ROWS=$r timeout 60 "${PYTEST[@]}" "$TESTS" -k "not public" 2>&1 | tail -3 | tee -a "$LOG"
done
for r in 1 4; do
  stamp "bench_l2norm JCA_L2NORM_ROWS=$r"
  JCA_L2NORM_ROWS=$r timeout 45 $PY -P "$REPO/benchmarks/bench_l2norm.py" --no-public \
    --out "/tmp/bl_rows$r" 2>&1 | grep "^|\|card" | tee -a "$LOG"
done
stamp "bench_l2norm (default rows per team) + public op"
timeout 80 $PY -P "$REPO/benchmarks/bench_l2norm.py" --out "$OUT" 2>&1 | tail -14 | tee -a "$LOG"
for fused in 0 1; do
  stamp "bench.py --paths cuda cudnn --dims 128 --seqs 4096, JCA_FUSED_L2NORM=$fused"
  JCA_FUSED_L2NORM=$fused timeout 60 $PY -P "$REPO/benchmarks/bench.py" --paths cuda cudnn \
    --dims 128 --seqs 4096 --long --out "/tmp/bench_fused$fused" 2>&1 | grep "^|\|card" | tee -a "$LOG"
  cp /tmp/bench_fused$fused/bench_bf16.json "$OUT/bench_public_fused$fused.json" 2>/dev/null
done
stamp "compute-sanitizer memcheck (l2norm kernels)"
for r in 2 4; do
JCA_L2NORM_ROWS=$r timeout 45 compute-sanitizer --tool memcheck --kernel-name kns=l2norm \
  --error-exitcode 9 $PY -P -c "
import jax, jax.numpy as jnp
from jax_cosine_attention import _l2norm_op
for shape, g in (((3, 37, 5, 96), 4), ((555, 128), 1), ((7, 1024), 2), ((5, 64), 16), ((3, 8), 1)):
    for dt in (jnp.bfloat16, jnp.float16):
        x = jnp.ones(shape, dt)
        y, vjp = jax.vjp(lambda x: _l2norm_op.l2norm(x, g), x)
        jax.block_until_ready((y, vjp(y)))
print('done')" 2>&1 | grep -E "ERROR SUMMARY|done|rror" | head -5 | tee -a "$LOG"
done
stamp "CPU oracle suite through the CUDA path (time-boxed)"
timeout 50 "${PYTEST[@]}" "$REPO/tests/test_numerics.py" -k cuda -x 2>&1 | tail -4 | tee -a "$LOG"
stamp "end"
