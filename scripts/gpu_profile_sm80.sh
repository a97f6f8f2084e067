#!/usr/bin/env bash
# The portable (sm_80) kernels next to FlashAttention-2 on the same card: build + install (as
# gpu_check.sh, no tests), bench.py for kernel_sm80, FA2 through PyTorch (benchmarks/fa2_reference.py),
# then ncu detail sections of our D=128 forward / backward kernels and FA2's.
# Usage: scripts/gpu_profile_sm80.sh OUTDIR [D]
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_profile_sm80.sh OUTDIR [D]}")
D=${2:-128}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
JCA_SKIP_TESTS=1 JCA_SKIP_SANITIZER=1 JCA_SKIP_BENCH=1 bash "$REPO/scripts/gpu_check.sh" "$OUT" || exit 1
cd /tmp
$PY -P "$REPO/benchmarks/bench.py" --out "$OUT" --paths kernel_sm80 --dims $D --seqs 4096 --long \
  2>&1 | grep -v "it/s]" | tail -8
$PY -P "$REPO/benchmarks/fa2_reference.py" --out "$OUT" --dims $D --seqs 4096 2>&1 | tail -3
SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
  --section LaunchStats --section Occupancy --section SchedulerStats --section WarpStateStats
  --section InstructionStats --section SourceCounters"
profile() {  # name, kernel regex, command...
  local name=$1 regex=$2; shift 2
  ncu --clock-control none $SECTIONS --kernel-name regex:"$regex" --launch-skip 1 --launch-count 1 \
      "$@" > "$OUT/ncu_$name.txt" 2>&1
  echo "ncu $name rc=$? $(grep -E 'Duration|Registers Per' "$OUT/ncu_$name.txt" | tr -s ' ' | tr '\n' ' ')"
}
JCA_SM90=0 profile ours_bwd "dkdv_dq_kernel" $PY -P "$REPO/benchmarks/profile_kernels.py" $D
JCA_SM90=0 profile ours_fwd "^fwd_kernel$" $PY -P "$REPO/benchmarks/profile_kernels.py" $D
profile fa2_bwd "flash_bwd_dq_dk_dv" $PY -P "$REPO/benchmarks/fa2_reference.py" --profile-step $D
profile fa2_fwd "flash_fwd_kernel" $PY -P "$REPO/benchmarks/fa2_reference.py" --profile-step $D
