#!/usr/bin/env bash
# Build + install (as gpu_check.sh, no tests), then benchmarks/kernel_variants.py once per kernel
# variant (the value of environment variable ENV), the variants in ABAB order (two rounds). Usage:
#   scripts/gpu_variants.sh OUTDIR ENV "0@64,128 1@128 ..." [kernel_variants.py args]
# (variant@head dims; without @, the dims of the args)
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_variants.sh OUTDIR ENV VARIANTS [args]}")
ENV=${2:?env variable}
VARIANTS=${3:?variants}
shift 3
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT" || exit 1
cd /tmp
for round in 1 2; do
  for vd in $VARIANTS; do
    v=${vd%@*}; dims=()
    [ "$vd" != "$v" ] && dims=(--dims ${vd#*@}) && dims=(${dims[@]//,/ })
    env "$ENV=$v" timeout 120 $PY -P "$REPO/benchmarks/kernel_variants.py" --env "$ENV" "$@" "${dims[@]}" \
        2>>"$OUT/variants.err" | tee -a "$OUT/variants.jsonl"
  done
done
