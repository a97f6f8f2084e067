#!/usr/bin/env bash
# ncu `--set detailed` of one kernel in each of several builds (the names of
# scripts/gpu_experiments.sh: "tree", experiment diffs, "a+b"), built side by side in one device
# call; benchmarks/profile_kernels.py D runs the raw fwd + bwd (B4 H16 N4096, non-causal).
# Usage: scripts/gpu_ncu_experiments.sh OUTDIR "name1 name2 ..." KERNEL_REGEX [D]
# Writes OUTDIR/<name>_details.txt and <name>_raw.csv.gz (scripts/ncu_profile.sh) and prints each
# build's throughput lines.
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_ncu_experiments.sh OUTDIR NAMES REGEX [D]}")
NAMES=${2:?experiment names}
REGEX=${3:?kernel name regex}
D=${4:-128}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=/tmp/jca_exp  # where gpu_experiments.sh installs each build (<name>/site)
JCA_EXP_ROUNDS=0 bash "$REPO/scripts/gpu_experiments.sh" "$OUT" "$NAMES" | tail -5
cd /tmp
for name in $NAMES; do
  PYTHONPATH=$WORK/$name/site bash "$REPO/scripts/ncu_profile.sh" "$OUT" "$name" "$REGEX" 1 1 \
      "Duration|Throughput|Busy|Issue Slots" -- $PY -P "$REPO/benchmarks/profile_kernels.py" "$D"
done
