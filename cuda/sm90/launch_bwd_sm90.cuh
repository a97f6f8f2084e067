// Host side of the sm_90a backward: delta / lse2 preprocess (the sm_80 kernel's), zeroed dq_acc,
// then the main kernel over (key tile, kv head, batch). Instantiated in cuda/sm90/inst/bwd_*.cu.
#pragma once
#include "../bwd_kernel.cuh"
#include "bwd_kernel_sm90.cuh"

namespace jca::sm90 {

template <int D, typename T>
cudaError_t run_bwd(const Params& p, cudaStream_t stream) {
  using Tr = BwdTraits<D, T>;
  using E = typename Tr::Element;
  const int64_t rows = int64_t(p.B) * p.T * p.N;
  if (rows > 0) {
    const int warps = 8;
    bwd_preprocess<T><<<unsigned((rows + warps - 1) / warps), 32 * warps, 0, stream>>>(p);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (cudaError_t e = cudaMemsetAsync(p.dq_acc, 0, size_t(rows) * D * sizeof(float), stream);
      e != cudaSuccess)
    return e;
  auto q_tile = take<0, 2>(typename Tr::SmemLayoutQ{});
  BwdArgs<Tr> args{
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.q, p.T, p.N, p.B), q_tile,
                    Shape<Int<Tr::BM>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.dout, p.T, p.N, p.B), q_tile,
                    Shape<Int<Tr::BM>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.k, p.S, p.KH, p.B),
                    typename Tr::SmemLayoutKV{}, Shape<Int<Tr::BN>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.v, p.S, p.KH, p.B),
                    typename Tr::SmemLayoutKV{}, Shape<Int<Tr::BN>, Int<D>>{}, _1{}),
      p};
  auto kernel = bwd_kernel_sm90<Tr>;
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(Tr::kSmem));
      e != cudaSuccess)
    return e;
  const dim3 grid((p.S + Tr::BN - 1) / Tr::BN, p.KH, p.B);
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace jca::sm90
