#!/usr/bin/env bash
# One ncu `--set detailed` profile, kept as text: OUTDIR/NAME_details.txt (the details page) and
# OUTDIR/NAME_raw.csv.gz (every metric, for benchmarks/ncu_compare.py); prints the lines of the
# details page that match SUMMARY_REGEX. The .ncu-rep report itself is not kept (size).
# Usage: scripts/ncu_profile.sh OUTDIR NAME KERNEL_REGEX SKIP COUNT SUMMARY_REGEX -- COMMAND...
set -uo pipefail
OUT=$1 NAME=$2 REGEX=$3 SKIP=$4 COUNT=$5 SUMMARY=$6
shift 6; [ "${1:-}" = -- ] && shift
timeout 240 ncu --clock-control none --set detailed --kernel-name regex:"$REGEX" \
    --launch-skip "$SKIP" --launch-count "$COUNT" -f -o "$OUT/$NAME" "$@" > "$OUT/$NAME.log" 2>&1
echo "ncu $NAME rc=$?"
ncu --import "$OUT/$NAME.ncu-rep" --page details > "$OUT/${NAME}_details.txt" 2>&1
ncu --import "$OUT/$NAME.ncu-rep" --page raw --csv 2>&1 | gzip > "$OUT/${NAME}_raw.csv.gz"
grep -E "$SUMMARY" "$OUT/${NAME}_details.txt" | head -60
rm -f "$OUT/$NAME.ncu-rep"
