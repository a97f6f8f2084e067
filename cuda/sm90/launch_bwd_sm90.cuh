// Host side of the sm_90a backward: delta / lse2 preprocess (the sm_80 kernel's), then the dQ
// kernel over (query tile, head, batch) and the plain dK/dV kernel over (key tile, kv head,
// batch) -- or, opt-in, the dK/dV kernel with the fused dQ (reduced into the zeroed dq_acc).
// The two kernels are independent (both read the preprocess's rows), so the dK/dV kernel is a
// programmatic dependent launch that starts filling SMs during the dQ kernel's last wave.
// Instantiated in cuda/sm90/inst/bwd_*.cu.
#pragma once
#include "../bwd_kernel.cuh"
#include "bwd_dkdv_kernel_sm90.cuh"
#include "bwd_dq_kernel_sm90.cuh"

namespace jca::sm90 {

template <class Tr>
cudaError_t launch_dq(const Params& p, cudaStream_t stream) {
  using E = typename Tr::Element;
  constexpr int D = Tr::D;
  auto q_tile = typename Tr::SmemLayoutQ{};
  auto kv_tile = take<0, 2>(typename Tr::SmemLayoutKV{});
  BwdDqArgs<Tr> args{
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.q, p.T, p.N, p.B), q_tile,
                    Shape<Int<Tr::BR>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.dout, p.T, p.N, p.B), q_tile,
                    Shape<Int<Tr::BR>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_rows_view<E, D>(p.q_raw ? p.q_raw : p.q, p.T, p.N, p.B), q_tile,
                    Shape<Int<Tr::BR>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.k, p.S, p.KH, p.B), kv_tile,
                    Shape<Int<Tr::BC>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.v, p.S, p.KH, p.B), kv_tile,
                    Shape<Int<Tr::BC>, Int<D>>{}, _1{}),
      p};
  auto kernel = p.q_raw ? bwd_dq_kernel_sm90<Tr, true> : bwd_dq_kernel_sm90<Tr, false>;
  return launch_big_smem(kernel, args,
                         dim3((p.T + Tr::BR - 1) / Tr::BR, p.N, p.B), Tr::kThreads, Tr::kSmem,
                         stream);
}

template <class Tr>
cudaError_t launch_dkdv(const Params& p, cudaStream_t stream) {
  using E = typename Tr::Element;
  constexpr int D = Tr::D;
  auto q_tile = take<0, 2>(typename Tr::SmemLayoutQ{});
  auto kv_tile = typename Tr::SmemLayoutKV{};
  BwdDkvArgs<Tr> args{
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.q, p.T, p.N, p.B), q_tile,
                    Shape<Int<Tr::BM>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.dout, p.T, p.N, p.B), q_tile,
                    Shape<Int<Tr::BM>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.k, p.S, p.KH, p.B), kv_tile,
                    Shape<Int<Tr::BN>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.v, p.S, p.KH, p.B), kv_tile,
                    Shape<Int<Tr::BN>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_rows_view<E, D>(p.k_raw ? p.k_raw : p.k, p.S, p.KH, p.B), kv_tile,
                    Shape<Int<Tr::BN>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_REDUCE_ADD{},
                    gmem_rows_view<float, D>(p.dq_acc, p.T, p.N, p.B),
                    typename Tr::SmemLayoutdQw{}, Shape<_16, Int<D / 2>>{}, _1{}),
      p};
  auto kernel = bwd_dkdv_kernel_sm90<Tr, false>;
  if constexpr (!Tr::kFuseDq) {
    if (p.k_raw) kernel = bwd_dkdv_kernel_sm90<Tr, true>;
  }
  // The plain dK/dV kernel reads nothing the dQ kernel before it writes: its CTAs fill the SMs
  // that the dQ kernel's last wave leaves idle.
  return launch_big_smem(kernel, args,
                         dim3((p.S + Tr::BN - 1) / Tr::BN, p.KH, p.B), Tr::kThreads, Tr::kSmem,
                         stream, /*overlap_previous=*/!Tr::kFuseDq);
}

// The fused-dQ backward is opt-in (Params::sm90_fused_dq; Python: JCA_SM90_FUSED_DQ=1): on an
// H100 it measured slower than the two-kernel backward (benchmarks/NOTES.md); it is never taken
// in deterministic mode.
template <int D, typename T>
cudaError_t run_bwd(const Params& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.B) * p.T * p.N;
  const bool fused = p.sm90_fused_dq && !p.deterministic;
  if (fused && rows > 0) {
    if (cudaError_t e = cudaMemsetAsync(p.dq_acc, 0, rows * D * sizeof(float), stream);
        e != cudaSuccess)
      return e;
  }
  if (cudaError_t e = launch_preprocess<T>(p, stream); e != cudaSuccess) return e;
  if (!fused) {  // dQ by its own kernel, plain stores: bitwise reproducible
    if (cudaError_t e = launch_dq<BwdDqTraits<D, T>>(p, stream); e != cudaSuccess) return e;
    return launch_dkdv<BwdDkvTraits<D, T, false>>(p, stream);
  }
  // dQ reduced into dq_acc by every key tile's CTA (5 products instead of 7; summation order
  // varies from run to run).
  return launch_dkdv<BwdDkvTraits<D, T, true>>(p, stream);
}

}  // namespace jca::sm90
