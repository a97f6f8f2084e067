#!/usr/bin/env bash
# Build + install the CUDA extension, run the GPU tests, compute-sanitizer on one small fwd+bwd,
# then the benchmark. All logs / JSON go to OUTDIR. Usage: scripts/gpu_check.sh OUTDIR [bench args]
# Env: JCA_SKIP_BUILD=1 (already installed), JCA_SKIP_TESTS=1, JCA_SKIP_SANITIZER=1, JCA_SKIP_BENCH=1, JCA_TEST_K="expr" (pytest -k) to trim,
# JCA_SKIP_SM80_RERUN=1 (by default, when the sm_90a kernels are built, the GPU tests run a second
# time with JCA_SM90=0 so that both forward paths pass the suite).
# The GPU machine has no network: wheels it lacks (nvidia-cutlass, for the sm_90a kernels' CuTe
# headers) are installed from .wheels/ in the repo when present (carry that folder).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_check.sh OUTDIR [bench args]}")
shift || true
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

if ls "$REPO"/.wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index "$REPO"/.wheels/*.whl 2>&1 | tail -2
fi

if [ "${JCA_SKIP_BUILD:-0}" != 1 ]; then
echo "== build + install" | tee "$OUT/build.log"
t0=$(date +%s)
made_readme=0  # pyproject's readme must exist for the metadata step
[ -f "$REPO/README.md" ] || { echo "# jax-cosine-attention" > "$REPO/README.md"; made_readme=1; }
( cd "$REPO" && JCA_CUDA=ON JCA_CUDA_ARCHS=${JCA_CUDA_ARCHS:-90a} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    $PY -m pip install --no-build-isolation --no-deps --no-index -v . ) >> "$OUT/build.log" 2>&1
rc=$?
[ $made_readme = 1 ] && rm -f "$REPO/README.md"
echo "build rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
grep -E "spill|error" "$OUT/build.log" | grep -v "0 bytes spill" | head -20
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit 1; fi
fi

# From outside the repo root: the installed package (with the .so) must be the one imported.
cd /tmp
$PY -P -c "from jax_cosine_attention import _cuda as c; print('ext', c.AVAILABLE, c.IMPORT_ERROR, c.__file__, c._C.ffi_api_version if c._C else None, 'sm90_built', c.SM90_BUILT)" 2>&1 | tee -a "$OUT/env.txt"
SM90_BUILT=$($PY -P -c "from jax_cosine_attention import _cuda as c; print(int(c.SM90_BUILT))" 2>/dev/null || echo 0)

if [ "${JCA_SKIP_TESTS:-0}" != 1 ]; then
  echo "== GPU tests"
  $PY -P -m pytest -q -p no:cacheprovider --rootdir /tmp "$REPO/tests/gpu" ${JCA_TEST_K:+-k "$JCA_TEST_K"} \
      -x --durations=8 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  if [ "$SM90_BUILT" = 1 ] && [ "${JCA_SKIP_SM80_RERUN:-0}" != 1 ]; then
    echo "== GPU tests again, sm_80 forward only (JCA_SM90=0)"
    JCA_SM90=0 $PY -P -m pytest -q -p no:cacheprovider --rootdir /tmp "$REPO/tests/gpu" \
        ${JCA_TEST_K:+-k "$JCA_TEST_K"} -x 2>&1 | tee "$OUT/gpu_tests_sm80.log" | tail -5
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  fi
fi

if [ "${JCA_SKIP_SANITIZER:-0}" != 1 ]; then
  echo "== compute-sanitizer"
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --kernel-name kns=jca --error-exitcode 9 \
        $PY -P "$REPO/tests/gpu/sanitize_small.py" > "$OUT/sanitizer_$tool.log" 2>&1
    src=$?
    echo "compute-sanitizer $tool rc=$src: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|done' "$OUT/sanitizer_$tool.log" | tr '\n' ' ')"
    [ $src -eq 0 ] || { tail -30 "$OUT/sanitizer_$tool.log"; status=1; }
  done
fi

if [ "${JCA_SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmark"
  $PY -P "$REPO/benchmarks/bench.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "it/s]" | tail -60
fi
exit $status
