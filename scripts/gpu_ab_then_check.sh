#!/usr/bin/env bash
# One device call: build, one A/B round of two kernel variants (ENV=0 vs ENV=1, kernel_variants.py),
# then the GPU tests and the benchmark with the faster one exported. Usage:
#   scripts/gpu_ab_then_check.sh OUTDIR ENV "kernel_variants.py args" [bench.py args]
set -uo pipefail
OUT=$(realpath -m "${1:?usage: OUTDIR ENV VARIANT_ARGS [bench args]}")
ENV=${2:?env variable}
VARGS=${3:-}
shift 3
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT" > "$OUT.build.log" 2>&1 || { tail -30 "$OUT.build.log"; exit 1; }
cd /tmp
for v in 0 1; do
  env "$ENV=$v" timeout 150 $PY -P "$REPO/benchmarks/kernel_variants.py" --env "$ENV" $VARGS \
      2>>"$OUT/variants.err" | tee -a "$OUT/variants.jsonl"
done
best=$($PY -c "
import json, collections
t = collections.defaultdict(float)
for l in open('$OUT/variants.jsonl'):
    r = json.loads(l); t[r['variant']] += r['ms']
print(min(t, key=t.get))")
echo "== faster variant: $ENV=$best"
export "$ENV=$best"
JCA_SKIP_BUILD=1 JCA_SKIP_SM80_RERUN=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 timeout 300 bash "$REPO/scripts/gpu_check.sh" "$OUT" 2>&1 | grep -E "passed|failed|error" | tail -5
for c in "" --causal; do
  timeout 200 $PY -P "$REPO/benchmarks/bench.py" --out "$OUT" "$@" $c 2>&1 | grep -v "it/s" | grep -E "^\|" | grep -v "^| D"
done
