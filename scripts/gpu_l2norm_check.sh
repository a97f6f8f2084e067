#!/usr/bin/env bash
# One GPU call for the fused l2norm: build + install (scripts/gpu_check.sh, GPU tests filtered to
# l2norm), its benchmark, the public op before/after (bench.py with JCA_FUSED_L2NORM=0 / 1),
# compute-sanitizer memcheck on the l2norm kernels, then the CPU oracle suite through the CUDA
# path (time-boxed). Usage: scripts/gpu_l2norm_check.sh OUTDIR   (at most 8 files land in OUTDIR)
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_l2norm_check.sh OUTDIR}")
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG="$OUT/run.log"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*" | tee -a "$LOG"; }

stamp "build + GPU tests (-k l2norm)"
JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 JCA_SKIP_SM80_RERUN=1 JCA_TEST_K=l2norm \
  timeout 300 bash "$REPO/scripts/gpu_check.sh" "$OUT/h" 2>&1 | tail -25 | tee -a "$LOG"
cd /tmp
stamp "bench_l2norm"
timeout 80 $PY -P "$REPO/benchmarks/bench_l2norm.py" --out "$OUT" 2>&1 | tail -12 | tee -a "$LOG"
for fused in 0 1; do
  stamp "bench.py --paths cuda cudnn --dims 128 --seqs 4096, JCA_FUSED_L2NORM=$fused"
  JCA_FUSED_L2NORM=$fused timeout 60 $PY -P "$REPO/benchmarks/bench.py" --paths cuda cudnn \
    --dims 128 --seqs 4096 --long --out "/tmp/bench_fused$fused" 2>&1 | grep "^|\|card" | tee -a "$LOG"
  cp /tmp/bench_fused$fused/bench_bf16.json "$OUT/bench_public_fused$fused.json" 2>/dev/null
done
stamp "compute-sanitizer memcheck (l2norm kernels)"
timeout 45 compute-sanitizer --tool memcheck --kernel-name kns=l2norm --error-exitcode 9 \
  $PY -P -c "
import jax, jax.numpy as jnp
from jax_cosine_attention import _l2norm_op
for shape, g in (((3, 37, 5, 96), 4), ((555, 128), 1), ((7, 1024), 2), ((5, 64), 16)):
    for dt in (jnp.bfloat16, jnp.float16):
        x = jnp.ones(shape, dt)
        y, vjp = jax.vjp(lambda x: _l2norm_op.l2norm(x, g), x)
        jax.block_until_ready((y, vjp(y)))
print('done')" 2>&1 | grep -E "ERROR SUMMARY|done|rror" | head -5 | tee -a "$LOG"
stamp "CPU oracle suite through the CUDA path (time-boxed)"
timeout 50 $PY -P -m pytest -q -p no:cacheprovider --rootdir /tmp "$REPO/tests/test_numerics.py" \
  -k cuda -x 2>&1 | tail -4 | tee -a "$LOG"
stamp "end"
