// Forward kernel: one CTA per (query tile of BR rows, query head, batch); each warp owns 16 query
// rows whose Q fragments stay in registers; K/V tiles of BC keys stream through a 2-stage cp.async
// ring in shared memory; S = Q K^T and O += P V run on mma.sync m16n8k16 with P kept in
// registers as the A operand.
//
// Softmax, two paths chosen per CTA at run time (uniform branch):
//  * fixed shift (no bias, q/k bounded, |scale|*groups small enough for the P dtype):
//        p = 2^(s * scale*log2e + shift),  shift = (delta - |scale|*groups) * log2e
//    no running max, no rescaling; delta keeps f16 P inside f16's normal range.
//  * online max (bias present, unbounded inputs, or a bound too wide for the P dtype):
//    the usual running max in log2 units, exact for any bias magnitude.
// Row sums are kept per thread and reduced across the quad once, at the end.
#pragma once
#include "kernel_common.cuh"
#include "softmax_shift.cuh"

namespace jca {

template <int D_, int NW_, int MT_, int BC_, bool QSMEM_, int MINB_, typename T_>
struct FwdTraits {
  using T = T_;
  static constexpr int D = D_, NW = NW_, MT = MT_, BC = BC_;
  static constexpr bool kQSmem = QSMEM_;  // Q fragments re-read from smem (saves registers)
  static constexpr int BR = 16 * MT * NW;
  static constexpr int kThreads = 32 * NW;
  static constexpr int kStride = D + 8;  // padded smem row (16 B) -> conflict-free ldmatrix
  static constexpr int kStageElems = BC * kStride;
  static constexpr int kQElems = kQSmem ? BR * kStride : 0;
  static constexpr int kMinBlocks = MINB_;  // __launch_bounds__ min blocks per SM
  static constexpr size_t kSmem = (size_t(2) * 2 * kStageElems + kQElems) * sizeof(T);
};

// kGeneral = false: the instantiation for calls without a bias or a mask (the common case), which
// then carries neither their pointers nor their code.
template <class Tr, bool kGeneral>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) fwd_kernel(const Params p) {
  using T = typename Tr::T;
  using Op = MmaOp<T>;
  constexpr int D = Tr::D, BC = Tr::BC, BR = Tr::BR, ST = Tr::kStride, MT = Tr::MT;
  constexpr int KT = D / 16, NTS = BC / 8, NTO = D / 8, R = 2 * MT;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + 2 * Tr::kStageElems;
  T* sQ = sV + 2 * Tr::kStageElems;

  const int n = blockIdx.y, b = blockIdx.z;
  const int qtile = p.causal ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;  // longest tiles first
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int kh = n / p.hpk;
  const int t0 = qtile * BR;
  const int wr0 = t0 + warp * 16 * MT;  // first row of this warp

  const RowLimits L = make_limits(p, b);
  int rows[R], lims[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    rows[r] = wr0 + 8 * r + g;  // r = 2m + h: m-tile m, half h
    lims[r] = L(rows[r]);
  }
  const int warp_min_lim = min(L(wr0), L(wr0 + 16 * MT - 1));
  const int cta_last = min(t0 + BR, L.qlen) - 1;
  const int kv_end = cta_last >= t0 ? L(cta_last) : 0;
  const int ntiles = (kv_end + BC - 1) / BC;

  const int64_t qrow = int64_t(p.N) * D, krow = int64_t(p.KH) * D;
  const T* qb = static_cast<const T*>(p.q) + int64_t(b) * p.T * qrow + int64_t(n) * D;
  const T* kb = static_cast<const T*>(p.k) + int64_t(b) * p.S * krow + int64_t(kh) * D;
  const T* vb = static_cast<const T*>(p.v) + int64_t(b) * p.S * krow + int64_t(kh) * D;

  if (Tr::kQSmem) load_tile<BR, D, Tr::kThreads>(sQ, qb, qrow, t0, p.T, tid);
  if (ntiles > 0) {
    load_tile<BC, D, Tr::kThreads>(sK, kb, krow, 0, p.S, tid);
    load_tile<BC, D, Tr::kThreads>(sV, vb, krow, 0, p.S, tid);
  }
  cp_async_commit();

  uint32_t qf[Tr::kQSmem ? 1 : MT][Tr::kQSmem ? 1 : KT][4];
  if constexpr (!Tr::kQSmem) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
      load_a_global<KT>(qf[m], qb, qrow, wr0 + 16 * m, p.T, lane);
  }

  const float sc = p.scale[n];
  const float c2 = sc * kLog2e;
  const bool has_bias = kGeneral && p.bias != nullptr;
  const bool has_mask = kGeneral && p.mask != nullptr;
  const bool fixed = !has_bias && p.bounded &&
                     fabsf(sc) * p.norm_groups <= ShiftCfg<T>::kMaxBound;
  const float shift2 = fixed ? (ShiftCfg<T>::kDelta - fabsf(sc) * p.norm_groups) * kLog2e : 0.f;

  float oacc[MT][NTO][4];
#pragma unroll
  for (int m = 0; m < MT; ++m) zero_acc(oacc[m]);
  float lsum[R], mrow[R];  // mrow: online path only, log2 units
  const float* bias_r[R];
  const uint8_t* mask_r[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    lsum[r] = 0.f;
    mrow[r] = -INFINITY;
    const int t = min(rows[r], p.T - 1);
    bias_r[r] = has_bias ? p.bias + b * p.bias_sb + n * p.bias_sn + t * p.bias_st : nullptr;
    mask_r[r] = has_mask ? p.mask + b * p.mask_sb + n * p.mask_sn + t * p.mask_st : nullptr;
  }

  for (int it = 0; it < ntiles; ++it) {
    const int stage = it & 1;
    const int s0 = it * BC;
    if (it + 1 < ntiles) {
      load_tile<BC, D, Tr::kThreads>(sK + (stage ^ 1) * Tr::kStageElems, kb, krow, s0 + BC, p.S,
                                     tid);
      load_tile<BC, D, Tr::kThreads>(sV + (stage ^ 1) * Tr::kStageElems, vb, krow, s0 + BC, p.S,
                                     tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    float sacc[MT][NTS][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) zero_acc(sacc[m]);
    if constexpr (Tr::kQSmem)
      mgemm_sA_nt<MT, KT, NTS>(sacc, sQ + warp * 16 * MT * ST, sK + stage * Tr::kStageElems, ST,
                               lane);
    else
      mgemm_rB_nt<MT, KT, NTS>(sacc, qf, sK + stage * Tr::kStageElems, ST, lane);

    const bool need_check = (s0 + BC > warp_min_lim) || has_mask;
    // validity of element (r, s) (only evaluated in the CHECK variants)
    auto valid = [&](int r, int s) {
      bool ok = s < lims[r];
      if (ok && has_mask) ok = mask_r[r][s * p.mask_ss] != 0;
      return ok;
    };

    if (fixed) {
      auto body = [&](auto check, auto) {
        constexpr bool CHECK = decltype(check)::value;
        float part[R][2];
#pragma unroll
        for (int r = 0; r < R; ++r) part[r][0] = part[r][1] = 0.f;
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int j = 0; j < NTS; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = 2 * m + (e >> 1);
              float pv = ex2(fmaf(sacc[m][j][e], c2, shift2));
              if constexpr (CHECK) pv = valid(r, s0 + 8 * j + 2 * c + (e & 1)) ? pv : 0.f;
              sacc[m][j][e] = pv;
              part[r][j & 1] += pv;  // two independent chains per row
            }
#pragma unroll
        for (int r = 0; r < R; ++r) lsum[r] += part[r][0] + part[r][1];
      };
      dispatch2(need_check, false, body);
    } else {
      auto body = [&](auto check, auto bias) {
        constexpr bool CHECK = decltype(check)::value, BIAS = decltype(bias)::value;
        float tmax[R];
#pragma unroll
        for (int r = 0; r < R; ++r) tmax[r] = -INFINITY;
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int j = 0; j < NTS; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = 2 * m + (e >> 1);
              const int s = s0 + 8 * j + 2 * c + (e & 1);
              const bool ok = CHECK ? valid(r, s) : true;
              float x = sacc[m][j][e] * c2;
              if constexpr (BIAS) {
                if (ok) x = fmaf(bias_r[r][s * p.bias_ss], kLog2e, x);
              }
              if constexpr (CHECK) x = ok ? x : -INFINITY;
              sacc[m][j][e] = x;
              tmax[r] = fmaxf(tmax[r], x);
            }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float mnew = fmaxf(mrow[r], quad_max(tmax[r]));
          // alpha rescales what was accumulated under the old max; -inf old max: nothing yet.
          const float alpha = (mrow[r] == -INFINITY) ? 0.f : ex2(mrow[r] - mnew);
          if (mnew != mrow[r]) {
            lsum[r] *= alpha;
#pragma unroll
            for (int j = 0; j < NTO; ++j) {
              oacc[r >> 1][j][2 * (r & 1)] *= alpha;
              oacc[r >> 1][j][2 * (r & 1) + 1] *= alpha;
            }
          }
          mrow[r] = mnew;
          tmax[r] = (mnew == -INFINITY) ? 0.f : mnew;
        }
        float part[R][2];
#pragma unroll
        for (int r = 0; r < R; ++r) part[r][0] = part[r][1] = 0.f;
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int j = 0; j < NTS; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = 2 * m + (e >> 1);
              const float pv = ex2(sacc[m][j][e] - tmax[r]);  // -inf -> 0
              sacc[m][j][e] = pv;
              part[r][j & 1] += pv;
            }
#pragma unroll
        for (int r = 0; r < R; ++r) lsum[r] += part[r][0] + part[r][1];
      };
      dispatch2(need_check, has_bias, body);
    }

    uint32_t pf[MT][NTS / 2][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc_to_a<NTS, T>(pf[m], sacc[m]);
    mgemm_rB_t<MT, NTS / 2, NTO>(oacc, pf, sV + stage * Tr::kStageElems, ST, lane);
    __syncthreads();
  }
  cp_async_wait<0>();  // (no tiles: the Q group may still be in flight)

  // ---- epilogue: O / l, lse (natural log; -inf for empty rows)
  T* ob = static_cast<T*>(p.o) + int64_t(b) * p.T * qrow + int64_t(n) * D;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float l = quad_sum(lsum[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int t = rows[r];
    if (t < p.T) {
      uint32_t* orow = reinterpret_cast<uint32_t*>(ob + int64_t(t) * qrow);
      const int m = r >> 1, h = r & 1;
#pragma unroll
      for (int j = 0; j < NTO; ++j)
        orow[4 * j + c] = Op::pack(oacc[m][j][2 * h] * inv, oacc[m][j][2 * h + 1] * inv);
      if (c == 0) {
        const float off = fixed ? -shift2 : mrow[r];
        p.lse[(int64_t(b) * p.N + n) * p.T + t] = l > 0.f ? (off + log2f(l)) * kLn2 : -INFINITY;
      }
    }
  }
}

}  // namespace jca
