#!/usr/bin/env bash
# The end-of-session verification in device calls of under 10 minutes each, every result packed
# into one archive (the device tool returns a limited number of files).
# Usage: scripts/gpu_final.sh OUTDIR tests|sm80|bench|bench-causal|paired
#   tests: build, tests/gpu on the default paths, compute-sanitizer;
#   sm80: build, tests/gpu with JCA_SM90=0, the non-causal benchmark table;
#   bench-causal: build, the causal benchmark table;
#   bench: build, both tables;
#   paired: build, benchmarks/paired.py (alternating pairs against cuDNN) without and with causal.
set -uo pipefail
OUT=$(realpath -m "$1"); WHAT=$2
REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH=(--paths cuda kernel cudnn pallas_mgpu --dims 64 128 --seqs 4096 16384 --long)
status=0
check() {  # gpu_check.sh into OUT/WHAT with the given environment overrides and bench arguments
  env "$@" bash "$REPO/scripts/gpu_check.sh" "$OUT/$WHAT" "${ARGS[@]}" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
NO_BENCH=(JCA_SKIP_BENCH=1 JCA_SKIP_SANITIZER=1)
BENCH_ONLY=(JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1)
case $WHAT in
  tests) ARGS=(); check JCA_SKIP_BENCH=1 JCA_SKIP_SM80_RERUN=1 ;;
  sm80)  # JCA_SM90=0 is read at run time only: the build is the usual one
    ARGS=(); check "${NO_BENCH[@]}" JCA_SM90=0 JCA_SKIP_SM80_RERUN=1
    ARGS=("${BENCH[@]}"); check "${BENCH_ONLY[@]}" JCA_SKIP_BUILD=1 ;;
  bench-causal) ARGS=("${BENCH[@]}" --causal); check "${BENCH_ONLY[@]}" ;;
  bench)
    ARGS=("${BENCH[@]}"); check "${BENCH_ONLY[@]}"
    ARGS=("${BENCH[@]}" --causal); check "${BENCH_ONLY[@]}" JCA_SKIP_BUILD=1 ;;
  paired)  # with the SM clock and power sampled every 100 ms (UTC timestamps) into smi.csv
    ARGS=(); check JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1
    TZ=UTC nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv,noheader,nounits -lms 100 > "$OUT/$WHAT/smi.csv" &
    smi=$!
    for causal in "" --causal; do
      ( cd /tmp && python3 -P "$REPO/benchmarks/paired.py" --out "$OUT/$WHAT" $causal \
          --pairs 12 --lead-ms 200 ) 2>&1 | tee -a "$OUT/$WHAT/paired.log" | grep "^|"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
    kill $smi ;;
  *) echo "unknown step $WHAT"; exit 2 ;;
esac
tar -C "$OUT" -czf "$OUT/$WHAT.tgz" "$WHAT" && rm -rf "${OUT:?}/$WHAT"
exit $status
