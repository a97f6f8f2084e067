#!/usr/bin/env bash
# ncu warp-stall breakdown (raw metrics) and per-SASS-instruction stall samples of one kernel of
# benchmarks/profile_kernels.py (ours) or benchmarks/fa2_reference.py --profile-step (FA2).
# Usage: scripts/gpu_stalls.sh OUTDIR NAME KERNEL_REGEX D ours|fa2   (extension already installed)
set -uo pipefail
OUT=$(realpath -m "$1"); NAME=$2; REGEX=$3; D=$4; WHO=$5
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"; cd /tmp
if [ "$WHO" = fa2 ]; then prog=("$REPO/benchmarks/fa2_reference.py" --profile-step "$D")
else prog=("$REPO/benchmarks/profile_kernels.py" "$D"); fi
ncu --clock-control none --section WarpStateStats --section SourceCounters --section InstructionStats \
    --kernel-name regex:"$REGEX" --launch-skip 1 --launch-count 1 -f -o "$OUT/$NAME" \
    $PY -P "${prog[@]}" > "$OUT/$NAME.log" 2>&1
echo "ncu $NAME rc=$?"
ncu --import "$OUT/$NAME.ncu-rep" --page raw --csv > "$OUT/${NAME}_raw.csv" 2>&1
ncu --import "$OUT/$NAME.ncu-rep" --page source --csv --print-source sass > "$OUT/${NAME}_sass.csv" 2>&1
echo "source page rc=$? lines $(wc -l < "$OUT/${NAME}_sass.csv")"
