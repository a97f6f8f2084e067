#!/usr/bin/env bash
# Build + install (as gpu_check.sh, no tests), then benchmarks/trace_op.py: per-kernel GPU times
# and idle gaps of timed fwd+bwd loops. Usage: scripts/gpu_trace.sh OUTDIR [trace_op.py args]
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_trace.sh OUTDIR [trace_op args]}")
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT" || exit 1
cd /tmp && $PY -P "$REPO/benchmarks/trace_op.py" --out "$OUT" "$@" 2>&1 | tee -a "$OUT/trace.log"
