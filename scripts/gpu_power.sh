#!/usr/bin/env bash
# Build + install (as gpu_check.sh, no tests), then bench.py once per path while nvidia-smi samples
# the SM clock, power and throttle reasons every 100 ms: does a path run at lower clocks than
# another under sustained load? Usage: scripts/gpu_power.sh OUTDIR "path ..." [bench.py args]
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_power.sh OUTDIR PATHS [bench args]}")
PATHS=${2:?paths}
shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT" || exit 1
cd /tmp
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader,nounits -lms 100 > "$OUT/smi.csv" &
smi=$!
for path in $PATHS; do
  echo "start $path $(date +%s.%N)" >> "$OUT/marks.txt"
  $PY -P "$REPO/benchmarks/bench.py" --out "$OUT/$path" --paths "$path" "$@" > "$OUT/$path.log" 2>&1
  echo "end $path $(date +%s.%N)" >> "$OUT/marks.txt"
done
kill $smi
