#!/usr/bin/env bash
# A/B of the kernel experiments kept as diffs (benchmarks/experiments/*.diff) in ONE device call:
# each diff is applied to its own copy of the tree and built into its own --target folder (the
# builds run side by side), then benchmarks/kernel_variants.py runs JCA_EXP=0 (the default
# kernel, same build) and JCA_EXP=1 (the experiment) of every build, in ABAB order.
# Usage: scripts/gpu_experiments.sh OUTDIR "name1 name2 ..." [kernel_variants.py args]
# (names are diff files without .diff, "a+b" for diff b applied on top of diff a, or "tree" for
# the tree as it is; writes
# OUTDIR/<name>.build.log and OUTDIR/variants.jsonl)
# Env: JCA_EXP_VARIANTS="0 1" (default) the JCA_EXP values run per build; "0" where a diff is a
# plain before/after change with no knob. A name may carry its own list: "diff@1,2,3".
# Env: JCA_EXP_TESTS_K="pytest -k expression" (e.g. "sm90_paths or fwd_bwd_dims"; set but empty:
# all of tests/gpu) runs tests/gpu against every build's non-zero variants before the timing
# (logs OUTDIR/tests_<name>_<v>.log); JCA_EXP_TESTS_ON="name ..." limits them to those builds.
# Env: JCA_EXP_REUSE=1 keeps the builds of an earlier call of this script in the same machine session
# (a second timing pass with other arguments); JCA_EXP_ROUNDS (default 2) the ABAB rounds.
# Env: JCA_EXP_SCRIPT=benchmarks/x.py times with that script (args as given) instead of
# kernel_variants.py, its output in OUTDIR/<name>_<variant>_r<round>.log (JCA_EXP_TAIL lines shown).
# Env: JCA_DURING_BUILDS="command" runs alongside the builds (the GPU is idle then; its output
# goes to OUTDIR/during_builds.log), e.g. scripts/gpu_wgmma_rate.sh.
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_experiments.sh OUTDIR NAMES [args]}")
NAMES=${2:?experiment names}
shift 2
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=/tmp/jca_exp
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls "$REPO"/.wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index "$REPO"/.wheels/*.whl 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/env.txt"
[ "${JCA_EXP_REUSE:-0}" = 1 ] || rm -rf "$WORK"
mkdir -p "$WORK"
jobs_per_build=$(( $(nproc) / $(echo $NAMES | wc -w) + 1 ))
t0=$(date +%s)
[ -n "${JCA_DURING_BUILDS:-}" ] && { bash -c "$JCA_DURING_BUILDS" > "$OUT/during_builds.log" 2>&1 & }
variants_of() { case $1 in *@*) echo "${1#*@}" | tr , ' ';; *) echo "${JCA_EXP_VARIANTS:-0 1}";; esac; }
SPECS=$NAMES
NAMES=$(for spec in $SPECS; do echo "${spec%@*}"; done)
for name in $NAMES; do
  [ -f "$WORK/$name/site/jax_cosine_attention/__init__.py" ] && continue  # JCA_EXP_REUSE
  (
    src=$WORK/$name/src
    mkdir -p "$src" && cp -r "$REPO"/. "$src" && rm -rf "$src/build" "$src/.git"
    cd "$src" || exit 1
    if [ "$name" != tree ]; then  # "a+b": diff a, then diff b on top
      for part in ${name//+/ }; do patch -p1 -s < "benchmarks/experiments/$part.diff" || exit 1; done
    fi
    [ -f README.md ] || echo "# jax-cosine-attention" > README.md
    JCA_CUDA=ON JCA_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=$jobs_per_build \
      $PY -m pip install --no-build-isolation --no-deps --no-index -v --target "$WORK/$name/site" .
  ) > "$OUT/$name.build.log" 2>&1 &
done
wait
echo "builds done in $(( $(date +%s) - t0 )) s"
for name in $NAMES; do
  grep -E "spill" "$OUT/$name.build.log" | grep -v "0 bytes spill" | sort | uniq -c | head -5
  [ -f "$WORK/$name/site/jax_cosine_attention/__init__.py" ] || { echo "$name: build failed"; tail -30 "$OUT/$name.build.log"; }
done
cd /tmp
if [ -n "${JCA_EXP_TESTS_K+set}" ]; then
  for spec in $SPECS; do
    name=${spec%@*}
    [ -d "$WORK/$name/site" ] || continue
    for v in $(variants_of "$spec"); do
      [ "$v" = 0 ] && [ "$name" != tree ] && continue
      [ -n "${JCA_EXP_TESTS_ON:-}" ] && [[ " $JCA_EXP_TESTS_ON " != *" $name "* ]] && continue
      PYTHONPATH="$WORK/$name/site" JCA_EXP=$v timeout 300 $PY -P -m pytest -q -x -p no:cacheprovider \
          --rootdir /tmp "$REPO/tests/gpu" -k "$JCA_EXP_TESTS_K" > "$OUT/tests_${name}_$v.log" 2>&1
      echo "tests $name JCA_EXP=$v rc=$?: $(tail -1 "$OUT/tests_${name}_$v.log")"
    done
  done
fi
for round in $(seq "${JCA_EXP_ROUNDS:-2}"); do
  for spec in $SPECS; do
    name=${spec%@*}
    [ -d "$WORK/$name/site" ] || continue
    for v in $(variants_of "$spec"); do
      if [ -n "${JCA_EXP_SCRIPT:-}" ]; then  # another timing script, its output kept per run
        log="$OUT/${name}_${v}_r$round.log"
        PYTHONPATH="$WORK/$name/site" JCA_EXP=$v timeout 300 $PY -P "$REPO/$JCA_EXP_SCRIPT" "$@" \
            > "$log" 2>&1
        echo "== $name JCA_EXP=$v round $round"; grep -v "^\s*$" "$log" | tail -${JCA_EXP_TAIL:-20}
        continue
      fi
      PYTHONPATH="$WORK/$name/site" JCA_EXP=$v timeout 150 $PY -P "$REPO/benchmarks/kernel_variants.py" \
          --env JCA_EXP "$@" 2>>"$OUT/variants.err" | sed "s/^{/{\"experiment\": \"$name\", /" \
          | tee -a "$OUT/variants.jsonl"
    done
  done
done
