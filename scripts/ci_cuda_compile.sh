#!/usr/bin/env bash
# Compile-only check of the CUDA extension for sm_90a (CI has no GPU). Builds kernels + FFI glue
# against the installed jax's FFI headers, checks for register spills and that the module links.
# With the nvidia-cutlass wheel installed the sm_90a (CuTe) kernels are built and checked too.
# Usage: scripts/ci_cuda_compile.sh [BUILD_DIR]   (PYTHON defaults to python3)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$(mktemp -d)/jca-build}
PY=${PYTHON:-python3}
if ! command -v nvcc >/dev/null; then
  echo "ci_cuda_compile: nvcc not found on PATH" >&2
  exit 2
fi
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
t0=$(date +%s)
cmake -S "$REPO" -B "$BUILD" "${GEN[@]}" -DJCA_CUDA=ON -DJCA_CUDA_ARCHS=90a \
  -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_BUILD_TYPE=Release >"$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" 2>&1 | tee "$BUILD.build.log" | grep -E "error|warning" || true
test "${PIPESTATUS[0]}" -eq 0
so=$(ls "$BUILD"/_jca_cuda*.so)
if grep -q "Registers are spilled" "$BUILD.build.log"; then
  echo "ci_cuda_compile: WARNING register spills (see above)"
fi
# The sm_90a kernels must not spill (issue 4's SASS check), the opt-in fused-dQ one included.
sm90_spills=$(grep "Registers are spilled" "$BUILD.build.log" | grep "jca4sm90" || true)
if [ -n "$sm90_spills" ]; then
  echo "ci_cuda_compile: sm_90a kernels spill:"; echo "$sm90_spills"; exit 1
fi
# The module must import and hand out every FFI capsule (CPU-only jax is fine: registration of
# platform="CUDA" targets is deferred).
PYTHONPATH="$(dirname "$so")" "$PY" -c "
import _jca_cuda as m
r = m.registrations()
assert set(r) == {'jca_cosattn_fwd', 'jca_cosattn_bwd', 'jca_l2norm_fwd', 'jca_l2norm_bwd'}, r
print('ci_cuda_compile: ok, FFI API', m.ffi_api_version, 'sm_90a kernels', m.sm90_built)"
# The sm_90a microbenchmarks (benchmarks/*.cu) build against the same headers.
CUT=$("$PY" "$REPO/scripts/cutlass_include_dir.py")
if [ -f "$CUT/cute/tensor.hpp" ]; then
  for prog in wgmma_rate bwd_schedule_lab; do
    nvcc -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -I"$CUT" -I"$REPO/cuda" \
      -c "$REPO/benchmarks/$prog.cu" -o "$BUILD/$prog.o"
  done
  echo "ci_cuda_compile: benchmarks/wgmma_rate.cu, bwd_schedule_lab.cu compile"
  # Host-run check (no GPU needed): the epilogues' shared-memory addressing against CuTe's.
  nvcc -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -I"$CUT" -I"$REPO/cuda" \
    "$REPO/tests/cuda/smem_offsets_check.cu" -o "$BUILD/smem_offsets_check"
  "$BUILD/smem_offsets_check"
fi
# Host-run check (needs no CUTLASS): the dK/dV kernel's per-key mask bound against the per-row
# limits every other kernel uses.
nvcc -std=c++17 -arch=sm_90a -I"$REPO/cuda" "$REPO/tests/cuda/row_limits_check.cu" \
  -o "$BUILD/row_limits_check"
"$BUILD/row_limits_check"
echo "ci_cuda_compile: built $so in $(( $(date +%s) - t0 )) s"
