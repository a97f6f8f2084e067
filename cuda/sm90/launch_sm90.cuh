// Host side of the sm_90a forward kernel: TMA descriptors over q/k/v, grid, shared memory.
// Instantiated per (head dim, dtype) in cuda/sm90/inst/*.cu (built for sm_90a only).
#pragma once
#include <algorithm>
#include <cstdint>
#include "fwd_kernel_sm90.cuh"

namespace jca::sm90 {

// Tile configuration per head dim: 128 query rows (two consumer warpgroups) x 128 keys;
// the K/V ring is 2 stages deep at D=128 (160 KiB of smem with Q) and 3 at D=64.
template <int D, typename T>
using FwdConfig = FwdTraits<D, 128, (D <= 64 ? 3 : 2), T>;

template <int D, typename T>
cudaError_t run_fwd(const Params& p, cudaStream_t stream) {
  using Tr = FwdConfig<D, T>;
  using E = typename Tr::Element;
  KernelArgs<Tr> args{
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.q, p.T, p.N, p.B),
                    typename Tr::SmemLayoutQ{}, Shape<Int<Tr::BR>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.k, p.S, p.KH, p.B),
                    take<0, 2>(typename Tr::SmemLayoutKV{}), Shape<Int<Tr::BC>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows_view<E, D>(p.v, p.S, p.KH, p.B),
                    take<0, 2>(typename Tr::SmemLayoutKV{}), Shape<Int<Tr::BC>, Int<D>>{}, _1{}),
      p};
  // Bias / dense mask: a separate instantiation (with the staged mask's smem), so that the plain
  // kernel carries none of it.
  const bool bias_mask = p.bias != nullptr || p.mask != nullptr;
  auto kernel = bias_mask ? fwd_kernel_sm90<Tr, true> : fwd_kernel_sm90<Tr, false>;
  const size_t smem = Tr::kSmem + (bias_mask ? Tr::kMaskSmem : 0);
  const int tiles = (p.T + Tr::BR - 1) / Tr::BR;
  // Without a causal mask every tile costs the same: a persistent grid, one CTA per SM (the next
  // tile's loads overlap the last one's epilogue).
  const int64_t work = int64_t(tiles) * p.N * p.B;  // the kernel counts work items in int
  if (!bias_mask && !p.causal && work <= INT32_MAX) {
    // Params' device fields are the caller's (the FFI handlers cache them per device), as
    // smem_optin is for launch_big_smem.
    if (p.sm_count <= 0) return cudaErrorInvalidValue;
    return launch_big_smem(fwd_kernel_sm90<Tr, false, true>, args,
                           dim3(unsigned(std::min<int64_t>(work, p.sm_count))), Tr::kThreads,
                           smem, stream);
  }
  return launch_big_smem(kernel, args, dim3(tiles, p.N, p.B), Tr::kThreads, smem, stream);
}

}  // namespace jca::sm90
