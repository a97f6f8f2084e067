#!/usr/bin/env bash
# Build + install (as gpu_check.sh, no tests), then benchmarks/bwd_variants.py once per backward
# kernel variant, the variants in ABAB order (two rounds). Usage:
#   scripts/gpu_bwd_variants.sh OUTDIR "0 1 2 ..." [bwd_variants.py args]
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_bwd_variants.sh OUTDIR VARIANTS [args]}")
VARIANTS=${2:?variants}
shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT" || exit 1
cd /tmp
for round in 1 2; do
  for v in $VARIANTS; do
    JCA_SM90_BWD_VARIANT=$v timeout 120 $PY -P "$REPO/benchmarks/bwd_variants.py" "$@" 2>>"$OUT/variants.err" \
        | tee -a "$OUT/variants.jsonl"
  done
done
