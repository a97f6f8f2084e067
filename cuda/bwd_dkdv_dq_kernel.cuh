// One-kernel backward for the larger head dims (FlashAttention-2's hdim-128 organisation):
// CTA = 8 warps per (128-key tile, kv head, batch), looping over the G query heads of the group
// and 64-row query tiles. Per step, 5 products:
//   S = Q K^T, dP = dO V^T   warps 2 (queries) x 4 (keys), 32 x 32 each; P and dS (unscaled) go
//                            to shared memory as [query][key];
//   dV += P^T dO, dK += dS^T Q   warps 4 (keys) x 2 (head dim), accumulators in registers;
//   dQ = dS K                 warps 2 (queries) x 4 (head dim), f32 red.add into dq_acc (zeroed).
// Against the dq + dK/dV kernel pair (7 products, every warp re-reading whole Q / dO tiles) this
// roughly halves the ldmatrix bytes per mma. Calls without a bias or a mask, not deterministic.
// kDoubleDO: dO has two stages like Q (175 KB of shared memory at D = 128); otherwise one (the
// tile fits the 163 KB of an A100) and the next dO tile is loaded once every warp has read it for
// dV, under the dK and dQ products.
#pragma once
#include "kernel_common.cuh"

namespace jca {

template <int D_, bool kDoubleDO_, typename T_>
struct DkvDqTraits {
  using T = T_;
  static constexpr int D = D_, BN = 128, BM = 64, kThreads = 256;
  static constexpr bool kDoubleDO = kDoubleDO_;
  static_assert(D % 64 == 0, "head dim split 2 ways (dK/dV) and 4 ways (dQ) in pairs of n8 tiles");
  static constexpr int kStride = D + 8;    // K, V, Q, dO rows (padded: conflict-free ldmatrix)
  static constexpr int kPStride = BN + 8;  // P, dS rows ([query][key])
  static constexpr int kKV = BN * kStride;
  static constexpr int kQS = BM * kStride;
  static constexpr int kPS = BM * kPStride;
  static constexpr int kDOStages = kDoubleDO ? 2 : 1;
  // K, V; Q x 2 stages; dO x kDOStages; P; dS (elements of T); lse2 and delta x 2 stages (f32)
  static constexpr size_t kSmem =
      (size_t(2) * kKV + size_t(2 + kDOStages) * kQS + size_t(2) * kPS) * sizeof(T) +
      4 * BM * sizeof(float);
};

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) dkdv_dq_kernel(const Params p) {
  using T = typename Tr::T;
  using Op = MmaOp<T>;
  constexpr int D = Tr::D, BN = Tr::BN, BM = Tr::BM, ST = Tr::kStride, PS = Tr::kPStride;
  constexpr int KT = D / 16, NKV = D / 16, NQ = D / 32;  // NKV, NQ: n8 tiles of D/2, D/4
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + Tr::kKV;
  T* sQ = sV + Tr::kKV;       // [2][BM][ST]
  T* sO = sQ + 2 * Tr::kQS;   // dO [kDOStages][BM][ST]
  T* sP = sO + Tr::kDOStages * Tr::kQS;  // [BM][PS]
  T* sdS = sP + Tr::kPS;      // [BM][PS]
  float* sL = reinterpret_cast<float*>(sdS + Tr::kPS);  // lse2 [2][BM]
  float* sDl = sL + 2 * BM;                              // delta [2][BM]

  const int ktile = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int s0 = ktile * BN;
  const RowLimits L = make_limits(p, b);
  // warp blocks: S/dP (query rows wq.., keys wk..), dK/dV (keys vk.., dims vd..), dQ (rows wq..,
  // dims qd..)
  const int wq = (warp & 1) * 32, wk = (warp >> 1) * 32;
  const int vk = (warp & 3) * 32, vd = (warp >> 2) * (D / 2);
  const int qd = (warp >> 1) * (D / 4);

  const int64_t qrow = int64_t(p.N) * D, krow = int64_t(p.KH) * D;
  const int64_t koff = int64_t(b) * p.S * krow + int64_t(kh) * D;
  const T* qbase = static_cast<const T*>(p.q) + int64_t(b) * p.T * qrow;
  const T* dobase = static_cast<const T*>(p.dout) + int64_t(b) * p.T * qrow;
  const int64_t rows_total = int64_t(p.B) * p.N * p.T;
  const float* delta = static_cast<const float*>(p.workspace);
  const float* lse2 = delta + rows_total;

  int qt_begin, nq;
  L.query_tiles(s0, BM, qt_begin, nq);
  const int total = p.hpk * nq;
  const bool one_scale = group_shares_scale(p, kh);  // else each step's dS^T fragments are

  const QuerySteps steps{qt_begin * BM, (qt_begin + nq) * BM, BM};
  auto load_q = [&](QueryStep s, int stage) {
    load_tile<BM, D, Tr::kThreads>(sQ + stage * Tr::kQS, qbase + int64_t(s.n) * D, qrow, s.tq0,
                                   p.T, tid);
    load_row_stats<BM, Tr::kThreads>(sL + stage * BM, sDl + stage * BM, lse2, delta,
                                     (int64_t(b) * p.N + s.n) * p.T, s.tq0, p.T, tid);
  };
  auto load_do = [&](QueryStep s, int stage) {
    load_tile<BM, D, Tr::kThreads>(sO + (Tr::kDoubleDO ? stage : 0) * Tr::kQS,
                                   dobase + int64_t(s.n) * D, qrow, s.tq0, p.T, tid);
  };
  QueryStep cur = steps.first(kh * p.hpk);

  if (total > 0) {
    load_tile<BN, D, Tr::kThreads>(sK, static_cast<const T*>(p.k) + koff, krow, s0, p.S, tid);
    load_tile<BN, D, Tr::kThreads>(sV, static_cast<const T*>(p.v) + koff, krow, s0, p.S, tid);
    load_q(cur, 0);
    load_do(cur, 0);
    cp_async_commit();
  }

  float dkacc[2][NKV][4], dvacc[2][NKV][4];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    zero_acc(dkacc[m]);
    zero_acc(dvacc[m]);
  }

  // Each step's scale is loaded a step ahead: a load right before its use stalled every step
  // (7 % of ncu's warp samples; the A/B measured 0-0.5 %: other stalls took its place).
  float sc_next = p.scale[cur.n];
  for (int it = 0; it < total; ++it) {
    const int stage = it & 1;
    const int n = cur.n, tq0 = cur.tq0;
    const QueryStep nxt = steps.next(cur);
    const float sc = sc_next;
    const float c2 = sc * kLog2e;
    if (it + 1 < total) sc_next = p.scale[nxt.n];
    cp_async_wait<0>();  // Q(it) and its row statistics, dO(it)
    __syncthreads();     // ... for every thread; step it-1 is done with Q stage (it+1)&1
    if (it + 1 < total) {
      load_q(nxt, stage ^ 1);
      if constexpr (Tr::kDoubleDO) load_do(nxt, stage ^ 1);
      cp_async_commit();
    }
    const T* q_s = sQ + stage * Tr::kQS;
    const T* o_s = sO + (Tr::kDoubleDO ? stage : 0) * Tr::kQS;
    const float* l_s = sL + stage * BM;
    const float* d_s = sDl + stage * BM;

    float sacc[2][4][4], dpacc[2][4][4];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      zero_acc(sacc[m]);
      zero_acc(dpacc[m]);
    }
    mgemm_sA_nt<2, KT, 4>(sacc, q_s + wq * ST, sK + wk * ST, ST, lane);   // S = Q K^T
    mgemm_sA_nt<2, KT, 4>(dpacc, o_s + wq * ST, sV + wk * ST, ST, lane);   // dP = dO V^T

    float rl[4], rd[4];  // rows wq + 16m + 8h + g, r = 2m + h
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      rl[r] = l_s[wq + 8 * r + g];
      rd[r] = d_s[wq + 8 * r + g];
    }
    // Masking only where this warp's block crosses the causal diagonal or a length.
    const bool need_check = tq0 + wq + 32 > L.qlen || s0 + wk + 32 > L.kvlen ||
                            (p.causal && s0 + wk + 31 > tq0 + wq + p.S - p.T);
    auto body = [&](auto check) {
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = 2 * m + (e >> 1);
            float pv = ex2(fmaf(sacc[m][j][e], c2, -rl[r]));
            if constexpr (decltype(check)::value) {
              const int t = tq0 + wq + 8 * r + g, s = s0 + wk + 8 * j + 2 * c + (e & 1);
              const bool ok = t < L.qlen && s < L.kvlen && (!p.causal || s <= t + p.S - p.T);
              pv = ok ? pv : 0.f;
            }
            sacc[m][j][e] = pv;
            dpacc[m][j][e] = pv * (dpacc[m][j][e] - rd[r]);
          }
    };
    if (need_check) body(BoolC<true>{});
    else body(BoolC<false>{});
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int off = (wq + 16 * m + 8 * h + g) * PS + wk + 8 * j + 2 * c;
          *reinterpret_cast<uint32_t*>(sP + off) = Op::pack(sacc[m][j][2 * h], sacc[m][j][2 * h + 1]);
          *reinterpret_cast<uint32_t*>(sdS + off) =
              Op::pack(dpacc[m][j][2 * h], dpacc[m][j][2 * h + 1]);
        }
    __syncthreads();  // P, dS complete

    mgemm_sA_sBt<2, BM / 16, NKV, true>(dvacc, sP + vk, PS, o_s + vd, ST, lane);  // dV += P^T dO
    if constexpr (!Tr::kDoubleDO) {
      __syncthreads();  // every warp has read dO(it)
      if (it + 1 < total) {
        load_do(nxt, 0);
        cp_async_commit();
      }
    }
    if (one_scale) {  // dK += dS^T Q (scaled at the end)
      mgemm_sA_sBt<2, BM / 16, NKV, true>(dkacc, sdS + vk, PS, q_s + vd, ST, lane);
    } else {  // dK += (scale dS)^T Q
      mgemm_sA_sBt<2, BM / 16, NKV, true, true>(dkacc, sdS + vk, PS, q_s + vd, ST, lane,
                                                Op::pack(sc, sc));
    }

    float qacc[2][NQ][4];  // dQ rows wq.., dims qd.. over this tile's keys
#pragma unroll
    for (int m = 0; m < 2; ++m) zero_acc(qacc[m]);
    mgemm_sA_sBt<2, BN / 16, NQ, false>(qacc, sdS + wq * PS, PS, sK + qd, ST, lane);
    float* dqb = p.dq_acc + int64_t(b) * p.T * qrow + int64_t(n) * D + qd + 2 * c;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int t = tq0 + wq + 8 * r + g;
      if (t < L.qlen) {  // rows past q_len have dS = 0
        float* row = dqb + int64_t(t) * qrow;
#pragma unroll
        for (int j = 0; j < NQ; ++j)
          red_add2(row + 8 * j, qacc[r >> 1][j][2 * (r & 1)], qacc[r >> 1][j][2 * (r & 1) + 1]);
      }
    }
    cur = nxt;
  }

  const float kscale = one_scale ? p.scale[kh * p.hpk] : 1.f;
  T* dkb = static_cast<T*>(p.dk) + koff;
  T* dvb = static_cast<T*>(p.dv) + koff;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int s = s0 + vk + 8 * r + g;
    if (s < p.S) {
      uint32_t* kr = reinterpret_cast<uint32_t*>(dkb + int64_t(s) * krow + vd);
      uint32_t* vr = reinterpret_cast<uint32_t*>(dvb + int64_t(s) * krow + vd);
      const int m = r >> 1, h = r & 1;
#pragma unroll
      for (int j = 0; j < NKV; ++j) {
        kr[4 * j + c] = Op::pack(kscale * dkacc[m][j][2 * h], kscale * dkacc[m][j][2 * h + 1]);
        vr[4 * j + c] = Op::pack(dvacc[m][j][2 * h], dvacc[m][j][2 * h + 1]);
      }
    }
  }
}

}  // namespace jca
