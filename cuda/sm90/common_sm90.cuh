// Pieces shared by the sm_90a kernels: CuTe element types, warpgroup GEMM issue, accumulator to
// A-operand layout, named barriers.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "../kernel_common.cuh"
#include "../l2norm_math.cuh"

namespace jca::sm90 {
using namespace cute;

template <typename T>
struct CuteType;
template <>
struct CuteType<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CuteType<__half> {
  using type = cutlass::half_t;
};

__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Waits until every bulk group of this thread has completed (not just read its source).
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

// acc (+)= A * B over the k-blocks of one warpgroup-level product, issued asynchronously and
// committed as one wgmma group (the caller waits). kRS: A comes from registers.
template <bool kZeroInit, bool kRS, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(Mma& mma, TA const& a, TB const& b, TC& c) {
  if constexpr (kRS) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRS) warpgroup_fence_operand(const_cast<TA&>(a));
}

// This thread's warpgroup, as a value the compiler knows is warp-uniform (CUTLASS's collectives
// do the same): shared-memory operand descriptors derived from the plain thread index live in
// vector registers and cost an R2UR pair before every wgmma that reads them.
__device__ __forceinline__ int uniform_warpgroup() {
  return __shfl_sync(0xffffffff, int(threadIdx.x) / 128, 0);
}

// Query tile of a CTA over grid x (causal: longest tiles first) and the number of BC-key tiles
// its rows may attend.
struct QueryTile {
  int index, t0, ntiles;
};
__device__ __forceinline__ QueryTile query_tile(const Params& p, const RowLimits& L, int BR,
                                                int BC, int x, int nx) {
  const int index = p.causal ? nx - 1 - x : x;
  const int t0 = index * BR;
  const int last = min(t0 + BR, L.qlen) - 1;
  const int kv_end = last >= t0 ? L(last) : 0;
  return {index, t0, (kv_end + BC - 1) / BC};
}
__device__ __forceinline__ QueryTile query_tile(const Params& p, const RowLimits& L, int BR,
                                                int BC) {
  return query_tile(p, L, BR, BC, int(blockIdx.x), int(gridDim.x));
}

// Pingpong of two consumer warpgroups (wg = 1, 2) issuing wgmmas in turns: named barrier
// 8 + wg - 1 is warpgroup wg's turn. Both must take the same number of turns; warpgroup 2 does
// not pass its last one (nobody would wait for it).
struct Pingpong {
  int mine, other;
  __device__ __forceinline__ Pingpong(int wg, bool any_turns)
      : mine(8 + (wg - 1)), other(8 + (2 - wg)) {
    if (wg == 2 && any_turns) named_bar_arrive(8, 256);  // warpgroup 1 goes first
  }
  __device__ __forceinline__ void wait() const { named_bar_sync(mine, 256); }
  __device__ __forceinline__ void pass() const { named_bar_arrive(other, 256); }
  __device__ __forceinline__ void pass_unless_last(bool last) const {
    if (mine == 8 || !last) pass();
  }
};

// A [B, rows, heads, D] global tensor as the (rows, D, heads, batch) view the TMA copies tile.
template <int D>
using GShape = Shape<int32_t, Int<D>, int32_t, int32_t>;
using GStride = Stride<int64_t, _1, int64_t, int64_t>;
template <class Element, int D>
auto gmem_rows_view(const void* ptr, int rows, int heads, int batch) {
  return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)),
                     GShape<D>{rows, Int<D>{}, heads, batch},
                     GStride{int64_t(heads) * D, _1{}, int64_t(D), int64_t(rows) * heads * D});
}
template <class Element, int D>
using GTensor = decltype(gmem_rows_view<Element, D>(nullptr, 0, 0, 0));

// Host: launch a kernel that needs more than 48 KiB of dynamic shared memory. overlap_previous:
// programmatic dependent launch -- the kernel's CTAs may start while the previous kernel on the
// stream still runs (once all of its CTAs have executed griddepcontrol.launch_dependents); the
// kernel must then not read what that kernel writes, and must execute griddepcontrol.wait before
// it completes so that work after it still sees the previous kernel finished.
template <class Kernel, class Args>
cudaError_t launch_big_smem(Kernel kernel, const Args& args, dim3 grid, int threads, size_t smem,
                            cudaStream_t stream, bool overlap_previous = false) {
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(smem));
      e != cudaSuccess)
    return e;
  if (!overlap_previous) {
    kernel<<<grid, threads, smem, stream>>>(args);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args);
}

// Device side of programmatic dependent launch (no-ops when the launch did not ask for it).
__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void wait_for_previous_grid() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

// Byte offset of element (r, c) of a 16-bit tile in `Layout`, a GMMA atom tiling: the atoms
// defer their swizzle to the smem pointer, where it acts on byte addresses, so it is applied to
// the byte offset (valid for tiles at 1024-byte aligned addresses). Checked against CuTe's own
// addressing by tests/cuda/smem_offsets_check.cu.
template <class Layout>
CUTE_HOST_DEVICE constexpr uint32_t smem_byte_offset(int r, int c) {
  return uint32_t(get_swizzle_portion(Layout{})(2 * int(get_nonswizzle_portion(Layout{})(r, c))));
}

// The 16-bit elements of a shared-memory tile at a thread's accumulator positions (i, i + 1),
// i even -- two adjacent columns -- as one 32-bit shared load per pair (smem: the tile's shared
// address). Element-wise CuTe access to the swizzled tile compiled to 16-bit generic loads with
// 64-bit address math (≈ 1500 integer instructions a thread in the dQ kernel's l2norm epilogue).
template <class Layout, class Coord, int N>
__device__ __forceinline__ void load_acc_pairs(uint32_t smem, const Coord& coord,
                                               uint32_t (&pairs)[N]) {
  CUTLASS_PRAGMA_UNROLL
  for (int j = 0; j < N; ++j) {
    const uint32_t off = smem_byte_offset<Layout>(get<0>(coord(2 * j)), get<1>(coord(2 * j)));
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(pairs[j]) : "r"(smem + off));
  }
}

// Stores a thread's share of a warpgroup's m64 accumulator tile, pair by pair: pair j holds
// columns (c, c + 1) of the thread's row j & 1 (the ((2, 2, N/8)) order), pair(j) gives what to
// write there (a packed 16-bit pair or a float2). out points at tile row 0, column 0; rows from
// `rows` on are skipped. One validity test and one address per row; a test, a branch and a
// 64-bit address per pair cost ≈ 16 instructions a pair.
template <class Elem, class Coord, class Pair>
__device__ __forceinline__ void store_acc_pairs(Elem* out, int64_t row_stride, int rows,
                                                const Coord& coord, Pair&& pair) {
  constexpr int kPairs = decltype(size(coord))::value / 2;
  using V = decltype(pair(0));
  const int c0 = get<1>(coord(0));
  CUTLASS_PRAGMA_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int r = get<0>(coord(2 * h));
    if (r >= rows) continue;
    Elem* row = out + int64_t(r) * row_stride + c0;
    CUTLASS_PRAGMA_UNROLL
    for (int j = h; j < kPairs; j += 2)
      *reinterpret_cast<V*>(row + (get<1>(coord(2 * j)) - c0)) = pair(j);
  }
}

// The l2norm backward fused into the backward kernels' epilogues, for the two rows a thread
// holds of an m64 accumulator tile (pair j: columns (c, c + 1) of row j & 1). acc: the gradient
// of the normalised rows up to the factor gscale; x2: the raw rows' 16-bit pairs at the same
// positions. Per row, dx = a acc - bx x (bwd_coeffs, with gscale folded into a); the row sums are
// reduced over the quad of lanes that holds the row. (A tile that saw no key has acc = 0 and
// nothing loaded: callers set a = bx = 0 there, as 1/sqrt(0) is infinite when eps = 0.)
template <class T, class Acc, int N>
__device__ __forceinline__ void l2norm_bwd_coeffs(const Acc& acc, const uint32_t (&x2)[N],
                                                  float gscale, float eps2, float (&a)[2],
                                                  float (&bx)[2]) {
  float sumsq[2] = {0.f, 0.f}, x_acc[2] = {0.f, 0.f};
  CUTLASS_PRAGMA_UNROLL
  for (int j = 0; j < N; ++j) {
    const int h = j & 1;
    const float2 x = MmaOp<T>::unpack(x2[j]);
    sumsq[h] += x.x * x.x + x.y * x.y;
    x_acc[h] += x.x * acc(2 * j) + x.y * acc(2 * j + 1);
  }
  CUTLASS_PRAGMA_UNROLL
  for (int h = 0; h < 2; ++h) {
    bwd_coeffs(quad_sum(sumsq[h]), gscale * quad_sum(x_acc[h]), eps2, a[h], bx[h]);
    a[h] *= gscale;
  }
}
// dx of pair j, packed to 16 bits.
template <class T, class Acc, int N>
__device__ __forceinline__ uint32_t l2norm_bwd_pair(const Acc& acc, const uint32_t (&x2)[N],
                                                    const float (&a)[2], const float (&bx)[2],
                                                    int j) {
  const int h = j & 1;
  const float2 x = MmaOp<T>::unpack(x2[j]);
  return MmaOp<T>::pack(a[h] * acc(2 * j) - bx[h] * x.x, a[h] * acc(2 * j + 1) - bx[h] * x.y);
}

// ((2,2,N/8), MMA_M, MMA_N) accumulator layout -> ((2,2,2), MMA_M, (N/16, MMA_N)) A-operand
// layout of the next product: for 16-bit types the registers already sit where wgmma wants them.
template <class Layout>
__device__ __forceinline__ auto acc_as_a_operand(Layout acc) {
  auto l = logical_divide(get<0>(acc), Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(l), get<1>(l), get<2, 0>(l)), get<1>(acc),
                     make_layout(get<2, 1>(l), get<2>(acc)));
}

}  // namespace jca::sm90
