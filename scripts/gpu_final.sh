#!/usr/bin/env bash
# The end-of-session verification in device calls of under 10 minutes each, every result packed
# into one archive (the device tool returns a limited number of files).
# Usage: scripts/gpu_final.sh OUTDIR tests|sm80|bench|bench-causal
#   tests: build, tests/gpu on the default paths, compute-sanitizer;
#   sm80: build, tests/gpu with JCA_SM90=0, the non-causal benchmark table;
#   bench-causal: build, the causal benchmark table;
#   bench: build, both tables.
set -uo pipefail
OUT=$(realpath -m "$1"); WHAT=$2
REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH=(--paths cuda kernel cudnn pallas_mgpu --dims 64 128 --seqs 4096 16384 --long)
case $WHAT in
  tests) JCA_SKIP_BENCH=1 JCA_SKIP_SM80_RERUN=1 bash "$REPO/scripts/gpu_check.sh" "$OUT/$WHAT" ;;
  sm80)
    JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT/$WHAT"
    (cd /tmp && JCA_SM90=0 XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -P -m pytest -q -p no:cacheprovider \
        --rootdir /tmp "$REPO/tests/gpu" -x > "$OUT/$WHAT/gpu_tests_sm80.log" 2>&1)
    echo "JCA_SM90=0 tests rc=$?: $(tail -1 "$OUT/$WHAT/gpu_tests_sm80.log")"
    JCA_SKIP_BUILD=1 JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 bash "$REPO/scripts/gpu_check.sh" \
        "$OUT/$WHAT" "${BENCH[@]}" | tail -25 ;;
  bench-causal)
    JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 bash "$REPO/scripts/gpu_check.sh" "$OUT/$WHAT" \
        "${BENCH[@]}" --causal | tail -25 ;;
  bench)
    JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 bash "$REPO/scripts/gpu_check.sh" "$OUT/$WHAT" \
        "${BENCH[@]}" | tail -25
    JCA_SKIP_BUILD=1 JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 bash "$REPO/scripts/gpu_check.sh" \
        "$OUT/$WHAT" "${BENCH[@]}" --causal | tail -25 ;;
  *) echo "unknown step $WHAT"; exit 2 ;;
esac
rc=${PIPESTATUS[0]}
tar -C "$OUT" -czf "$OUT/$WHAT.tgz" "$WHAT" && rm -rf "${OUT:?}/$WHAT"
exit $rc
