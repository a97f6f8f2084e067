// Launch templates: tile configuration per head dim, grid set-up, error checks. Instantiated per
// (head dim, dtype) in cuda/inst/*.cu so that builds parallelise.
#pragma once
#include "bwd_dkdv_dq_kernel.cuh"
#include "bwd_kernel.cuh"
#include "fwd_kernel.cuh"

namespace jca {

// Tile configuration per head dim (4 warps everywhere). JCA_TUNE selects an alternative set for
// A/B measurements (build with CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-DJCA_TUNE=1").
#ifndef JCA_TUNE
#define JCA_TUNE 0
#endif
template <int D>
struct Cfg {
  // forward: 4 warps x 32 query rows (2 m-tiles, FA2's 128-row tile); Q re-read from smem for
  // D > 64 to stay under 255 registers.
#if JCA_TUNE == 1
  // D <= 64: BC=32, Q in smem, 168 registers -> 3 CTAs (12 warps) per SM
  static constexpr int kFwdWarps = 4, kFwdMT = 2, kFwdBC = 32;
  static constexpr bool kFwdQSmem = true;
  static constexpr int kFwdMinBlocks = (D <= 64 ? 3 : 2);
#else
  static constexpr int kFwdWarps = 4, kFwdMT = 2, kFwdBC = (D <= 64 ? 64 : 32);
  static constexpr bool kFwdQSmem = D > 64;
  static constexpr int kFwdMinBlocks = 2;
#endif
  // Key tile of the plain forward (no bias / mask): 64 at D = 128 measured 8-12 % faster than 32
  // on the H100 despite 228 B of spills (the general kernel would spill 336 B: it keeps 32).
  static constexpr int kFwdBCPlain = (D == 128 && !JCA_TUNE) ? 64 : kFwdBC;
  // dq: 4 warps x 32 query rows, Q / dO re-read from smem
  static constexpr int kDqWarps = 4, kDqMT = 2, kDqBC = (D <= 32 ? 64 : 32);
  // dK/dV: 4 warps x 16*MT keys; BRQ query rows per step
#if JCA_TUNE == 1
  static constexpr int kDkvWarps = 4, kDkvMT = 1, kDkvBRQ = (D <= 64 ? 64 : 16);
  static constexpr int kDkvMinBlocks = 3;
#else
  // D = 32, 64: 32 keys per warp (2 m-tiles, 128-key CTA tile) and 32 query rows per step halve
  // the Q/dO shared-memory reads per mma (measured 1.26x on the H100 at D=64, N=4096).
  // D = 16: 16 keys per warp, 3 CTAs/SM. D > 64: 16 keys per warp (dK+dV accumulators already
  // take 128 registers), 32 query rows per step.
  static constexpr bool kWide = D == 32 || D == 64;
  static constexpr int kDkvWarps = 4, kDkvMT = kWide ? 2 : 1;
  static constexpr int kDkvBRQ = kWide ? 32 : (D <= 64 ? 64 : 32);
  static constexpr int kDkvMinBlocks = (D <= 16 ? 3 : 2);
#endif
  // fused dQ (red.add from the dK/dV kernel) measured faster for D <= 64 only (H100, N=4096)
  static constexpr bool kFuseDq = D <= 64;
  // Plain (no bias / mask) backward instantiations for D > 64, where they remove the general
  // kernels' spills (dq kernel at D = 128: 92 B -> 0; bwd 1.5 % faster on the H100). At D = 64
  // the plain dK/dV kernel spills more than the general one and measured 4-8 % slower.
  static constexpr bool kPlainBwd = D > 64;
  // The one-kernel backward (dkdv_dq_kernel, 5 products) for calls without a bias or a mask:
  // 1.21-1.24x (single-buffered dO), 1.24-1.31x (double) over the dq + dK/dV kernels at D = 128
  // on the H100; slower at D = 64 (3.85 vs 3.24-3.29 ms at N = 4096) than the fused-dQ dK/dV
  // kernel.
  static constexpr bool kDkvDq = D == 128;
};

// The largest shared memory per block of sm_86/89/120 (RTX 30xx/40xx/50xx, A10, L4, L40): tiles
// above it get a smaller alternative, taken where Params::smem_optin is below the default's need.
constexpr size_t kSmallDeviceSmem = 99 * 1024;

// Runs launch(Big{}) where Big fits the device, else launch(Small{}); Small is compiled only
// where Big needs more than a small device allows. fitting_smem: what that choice needs there.
template <class Big, class Small, class Launch>
cudaError_t with_fitting(const Params& p, Launch&& launch) {
  if constexpr (Big::kSmem > kSmallDeviceSmem) {
    if (Big::kSmem > size_t(p.smem_optin)) return launch(Small{});
  }
  return launch(Big{});
}
template <class Big, class Small>
constexpr size_t fitting_smem() {
  return Big::kSmem > kSmallDeviceSmem ? Small::kSmem : Big::kSmem;
}

template <class Kernel>
inline cudaError_t prepare(Kernel kernel, size_t smem, const Params& p) {
  if (smem > size_t(p.smem_optin)) return cudaErrorInvalidConfiguration;  // a launcher's bug
  if (smem > 48 * 1024)
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  return cudaSuccess;
}

template <class Tr, bool kGeneral>
cudaError_t launch_fwd(const Params& p, cudaStream_t stream) {
  auto kernel = fwd_kernel<Tr, kGeneral>;
  if (cudaError_t e = prepare(kernel, Tr::kSmem, p); e != cudaSuccess) return e;
  const dim3 grid((p.T + Tr::BR - 1) / Tr::BR, p.N, p.B);
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <int D, typename T, int BC>
using FwdCfgTraits = FwdTraits<D, Cfg<D>::kFwdWarps, Cfg<D>::kFwdMT, BC, Cfg<D>::kFwdQSmem,
                               Cfg<D>::kFwdMinBlocks, T>;

// The general kernel (bias, mask) only when the call has one: the plain one carries neither.
// Where the plain tile does not fit the device, it takes the general kernel's tile.
template <int D, typename T>
cudaError_t run_fwd(const Params& p, cudaStream_t stream) {
  using General = FwdCfgTraits<D, T, Cfg<D>::kFwdBC>;
  using Plain = FwdCfgTraits<D, T, Cfg<D>::kFwdBCPlain>;
  if (p.bias || p.mask) return launch_fwd<General, true>(p, stream);
  return with_fitting<Plain, General>(
      p, [&](auto tr) { return launch_fwd<decltype(tr), false>(p, stream); });
}

// dq kernel: 32 query rows per warp; 16 where that does not fit the device (D = 128: 102 KB).
template <int D, typename T>
using DqCfgTraits = DqTraits<D, Cfg<D>::kDqWarps, Cfg<D>::kDqMT, Cfg<D>::kDqBC, T>;
template <int D, typename T>
using DqSmallTraits = DqTraits<D, Cfg<D>::kDqWarps, 1, Cfg<D>::kDqBC, T>;

template <class TrQ>
cudaError_t launch_dq(const Params& p, cudaStream_t stream) {
  auto kernel = dq_kernel<TrQ, true>;
  if constexpr (Cfg<TrQ::D>::kPlainBwd) {
    if (!p.bias && !p.mask) kernel = dq_kernel<TrQ, false>;
  }
  if (cudaError_t e = prepare(kernel, TrQ::kSmem, p); e != cudaSuccess) return e;
  const bool ordered = p.dbias_mode == DBiasMode::kOrdered;
  const dim3 grid((p.T + TrQ::BR - 1) / TrQ::BR, (ordered && p.bias_dims[1] == 1) ? 1 : p.N,
                  (ordered && p.bias_dims[0] == 1) ? 1 : p.B);
  kernel<<<grid, TrQ::kThreads, TrQ::kSmem, stream>>>(p);
  return cudaGetLastError();
}

// dkdv_dq_kernel where Cfg enables it, for calls without a bias or a mask, not deterministic
// (dQ is reduced with atomics), where one of its tiles fits the device: dO double-buffered (175
// KB at D = 128; H100), else single-buffered (158 KB; A100); else the dq + dK/dV kernels.
template <int D, typename T>
bool uses_dkdv_dq(const Params& p) {
  if constexpr (!Cfg<D>::kDkvDq) {
    return false;
  } else {
    return !p.deterministic && !p.bias && !p.mask && p.dbias_mode == DBiasMode::kNone &&
           DkvDqTraits<D, false, T>::kSmem <= size_t(p.smem_optin);
  }
}

template <class Tr>
cudaError_t launch_dkdv_dq_tile(const Params& p, cudaStream_t stream) {
  auto kernel = dkdv_dq_kernel<Tr>;
  if (cudaError_t e = prepare(kernel, Tr::kSmem, p); e != cudaSuccess) return e;
  const dim3 grid((p.S + Tr::BN - 1) / Tr::BN, p.KH, p.B);
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <int D, typename T>
cudaError_t launch_dkdv_dq(const Params& p, cudaStream_t stream) {
  if constexpr (!Cfg<D>::kDkvDq) {
    return cudaErrorInvalidValue;
  } else {
    using Double = DkvDqTraits<D, true, T>;
    if (Double::kSmem <= size_t(p.smem_optin)) return launch_dkdv_dq_tile<Double>(p, stream);
    return launch_dkdv_dq_tile<DkvDqTraits<D, false, T>>(p, stream);
  }
}

template <int D, typename T>
cudaError_t run_bwd(const Params& p_in, cudaStream_t stream) {
  // dQ by f32 reductions into the zeroed dq_acc (5 GEMMs): the one-kernel backward (D = 128) or
  // the dK/dV kernel's fused dQ (D <= 64). Deterministic mode and bias gradients use the separate
  // dq kernel (plain stores, 7 GEMMs).
  Params p = p_in;
  const bool one_kernel = uses_dkdv_dq<D, T>(p);
  p.fuse_dq = one_kernel ||
              (Cfg<D>::kFuseDq && !p.deterministic && p.dbias_mode == DBiasMode::kNone);
  using TrKV = DkvTraits<D, Cfg<D>::kDkvWarps, Cfg<D>::kDkvMT, Cfg<D>::kDkvBRQ, Cfg<D>::kDkvMinBlocks, T>;
  auto kkv = dkdv_kernel<TrKV, true>;
  if constexpr (Cfg<D>::kPlainBwd) {
    if (!p.bias && !p.mask) kkv = dkdv_kernel<TrKV, false>;
  }
  if (!one_kernel) {
    if (cudaError_t e = prepare(kkv, TrKV::kSmem, p); e != cudaSuccess) return e;
  }

  if (p.dbias_mode != DBiasMode::kNone && p.dbias_elems > 0) {
    if (cudaError_t e = cudaMemsetAsync(p.dbias, 0, size_t(p.dbias_elems) * sizeof(float), stream);
        e != cudaSuccess)
      return e;
  }
  const int64_t rows = int64_t(p.B) * p.T * p.N;
  if (cudaError_t e = launch_preprocess<T>(p, stream); e != cudaSuccess) return e;
  if (p.fuse_dq) {
    if (cudaError_t e = cudaMemsetAsync(p.dq_acc, 0, size_t(rows) * p.D * sizeof(float), stream);
        e != cudaSuccess)
      return e;
  }
  if (one_kernel) return launch_dkdv_dq<D, T>(p, stream);
  if (!p.fuse_dq) {
    if (cudaError_t e = with_fitting<DqCfgTraits<D, T>, DqSmallTraits<D, T>>(
            p, [&](auto tr) { return launch_dq<decltype(tr)>(p, stream); });
        e != cudaSuccess)
      return e;
  }
  const dim3 gkv((p.S + TrKV::BCK - 1) / TrKV::BCK, p.KH, p.B);
  kkv<<<gkv, TrKV::kThreads, TrKV::kSmem, stream>>>(p);
  return cudaGetLastError();
}

// What MinSmemBytes reports: the largest need among the tiles a small device would run.
template <int D>
constexpr size_t min_smem() {
  using KV = DkvTraits<D, Cfg<D>::kDkvWarps, Cfg<D>::kDkvMT, Cfg<D>::kDkvBRQ, Cfg<D>::kDkvMinBlocks, __half>;
  // (the general forward's tile is never larger than the plain one's)
  const size_t fwd = fitting_smem<FwdCfgTraits<D, __half, Cfg<D>::kFwdBCPlain>,
                                  FwdCfgTraits<D, __half, Cfg<D>::kFwdBC>>();
  const size_t dq = fitting_smem<DqCfgTraits<D, __half>, DqSmallTraits<D, __half>>();
  const size_t m = fwd > dq ? fwd : dq;
  return m > KV::kSmem ? m : KV::kSmem;
}

}  // namespace jca
