#!/usr/bin/env bash
# One GPU-machine session for a lead's check: build + install, the CPU oracle suite again through
# the CUDA kernel, then (in the background, so it may span two device calls) the issue-6
# experiment. Usage: scripts/gpu_session.sh OUTDIR   |   scripts/gpu_session.sh --wait OUTDIR
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ "$1" = "--wait" ]; then
  OUT=$2
  while pgrep -f gpu_experiment.sh >/dev/null; do sleep 5; done
  tail -25 /tmp/jca_experiment.log
  tar -C /tmp -czf "$OUT/experiment.tar.gz" jca_experiment jca_experiment.log
  exit 0
fi
OUT=$1
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT/build" > /dev/null 2>&1
tail -2 "$OUT/build/build.log"; cat "$OUT/build/env.txt"
cd /tmp
python3 -P -m pytest -q -p no:cacheprovider --rootdir /tmp "$REPO/tests/test_numerics.py" \
  "$REPO/tests/test_transforms.py" -k cuda 2>&1 | tee "$OUT/cuda_oracle.log" | tail -12
rm -rf /tmp/jca_experiment
setsid nohup bash "$REPO/scripts/gpu_experiment.sh" /tmp/jca_experiment > /tmp/jca_experiment.log 2>&1 < /dev/null &
echo "experiment started"
