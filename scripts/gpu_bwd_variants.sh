#!/usr/bin/env bash
# Build + install (as gpu_check.sh, no tests), then benchmarks/bwd_variants.py once per backward
# kernel variant, the variants in ABAB order (two rounds). Usage:
#   scripts/gpu_bwd_variants.sh OUTDIR "0@64,128 1@128 ..." [bwd_variants.py args]
# (variant@head dims; without @, the dims of the args)
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_bwd_variants.sh OUTDIR VARIANTS [args]}")
VARIANTS=${2:?variants}
shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT" || exit 1
cd /tmp
for round in 1 2; do
  for vd in $VARIANTS; do
    v=${vd%@*}; dims=()
    [ "$vd" != "$v" ] && dims=(--dims ${vd#*@}) && dims=(${dims[@]//,/ })
    JCA_SM90_BWD_VARIANT=$v timeout 120 $PY -P "$REPO/benchmarks/bwd_variants.py" "$@" "${dims[@]}" \
        2>>"$OUT/variants.err" | tee -a "$OUT/variants.jsonl"
  done
done
