// Backward kernels (FA2 organisation, no dQ atomics):
//  1. bwd_preprocess: delta = rowsum(dO * O) (f32) and lse2 = lse * log2e into the workspace.
//  2. dq_kernel: per (query tile, head, batch), loops over key tiles, recomputes S and dP, writes
//     dq_acc = dS K (unscaled, f32) with plain stores and dbias (store / atomic / ordered).
//  3. dkdv_kernel: per (key tile, kv head, batch), loops over the G query heads of the group and
//     the query tiles, dK and dV stay in registers: dV += P^T dO, dK += scale_n dS^T Q. No atomics,
//     so dK/dV/dQ are deterministic by construction; only a broadcast dbias uses atomics (or the
//     ordered mode when deterministic is requested).
// P = 2^(s*scale*log2e + bias*log2e - lse2) is the normalised probability, so one path serves both
// forward softmax variants. Rows with lse = -inf (no valid key) get lse2 = +inf -> P = 0.
#pragma once
#include "kernel_common.cuh"

namespace jca {

// Row statistics of one (b, t, n) row into the workspace: delta = acc, lse2 = lse * log2e.
__device__ __forceinline__ void store_row_stats(const Params& p, int64_t row, float acc) {
  const int64_t rows = int64_t(p.B) * p.T * p.N;
  const int n = int(row % p.N);
  const int64_t bt = row / p.N;
  const int t = int(bt % p.T), b = int(bt / p.T);
  const int64_t idx = (int64_t(b) * p.N + n) * p.T + t;
  float* delta = static_cast<float*>(p.workspace);
  float* lse2 = delta + rows;
  delta[idx] = acc;
  const float l = p.lse_in[idx];
  lse2[idx] = (l == -INFINITY) ? INFINITY : l * kLog2e;
}

// delta = rowsum(dO * O) with 16-byte loads: kLanes lanes per row (a power of two >= D / 8),
// 32 / kLanes rows per warp and kRowSteps of them per warp in flight (memory-level parallelism;
// the earlier one row per warp with 4-byte loads ran ≈ 1.7x the time of reading dO and O).
template <typename T, int kLanes, int kRowSteps>
__global__ void bwd_preprocess(const Params p) {
  constexpr int kRowsPerWarp = (32 / kLanes) * kRowSteps;
  const int warps = blockDim.x / 32;
  const int lane = threadIdx.x & 31, sub = lane % kLanes;
  const int64_t rows = int64_t(p.B) * p.T * p.N;
  const int64_t row0 = (int64_t(blockIdx.x) * warps + threadIdx.x / 32) * kRowsPerWarp +
                       lane / kLanes;
  const int chunks = p.D / 8;  // 16-byte chunks per row
  float acc[kRowSteps];
  uint4 ov[kRowSteps], dv[kRowSteps];
#pragma unroll
  for (int r = 0; r < kRowSteps; ++r) {  // all loads first
    const int64_t row = row0 + r * (32 / kLanes);
    const bool ok = row < rows && sub < chunks;
    ov[r] = ok ? reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + row * p.D)[sub]
               : make_uint4(0, 0, 0, 0);
    dv[r] = ok ? reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + row * p.D)[sub]
               : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int r = 0; r < kRowSteps; ++r) {
    const uint32_t* a = reinterpret_cast<const uint32_t*>(&ov[r]);
    const uint32_t* bb = reinterpret_cast<const uint32_t*>(&dv[r]);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = MmaOp<T>::unpack(a[i]), y = MmaOp<T>::unpack(bb[i]);
      s = fmaf(x.x, y.x, fmaf(x.y, y.y, s));
    }
#pragma unroll
    for (int m = kLanes / 2; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    acc[r] = s;
  }
#pragma unroll
  for (int r = 0; r < kRowSteps; ++r) {
    const int64_t row = row0 + r * (32 / kLanes);
    if (sub == 0 && row < rows) store_row_stats(p, row, acc[r]);
  }
}

// delta and lse2 for every row (both backward paths run this first).
template <typename T>
cudaError_t launch_preprocess(const Params& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.B) * p.T * p.N;
  if (rows == 0) return cudaSuccess;
  constexpr int kWarps = 8, kSteps = 4;
  auto run = [&](auto kernel, int lanes) {
    const int64_t per_block = int64_t(kWarps) * (32 / lanes) * kSteps;
    kernel<<<unsigned((rows + per_block - 1) / per_block), 32 * kWarps, 0, stream>>>(p);
    return cudaGetLastError();
  };
  if (p.D <= 16) return run(bwd_preprocess<T, 2, kSteps>, 2);
  if (p.D <= 32) return run(bwd_preprocess<T, 4, kSteps>, 4);
  if (p.D <= 64) return run(bwd_preprocess<T, 8, kSteps>, 8);
  return run(bwd_preprocess<T, 16, kSteps>, 16);  // HeadDimSupported: D <= 128
}

template <int D_, int NW_, int MT_, int BC_, typename T_>
struct DqTraits {
  using T = T_;
  static constexpr int D = D_, NW = NW_, MT = MT_, BC = BC_;
  static constexpr int BR = 16 * MT * NW;  // query rows per CTA (MT 16-row tiles per warp)
  static constexpr int kThreads = 32 * NW;
  static constexpr int kStride = D + 8;
  static constexpr int kStageElems = BC * kStride;
  static constexpr int kQElems = BR * kStride;
  // K, V x 2 stages + Q and dO tiles (A operands re-read from smem)
  static constexpr size_t kSmem = (size_t(2) * 2 * kStageElems + size_t(2) * kQElems) * sizeof(T);
};

// kGeneral = false (dq_body, dq_kernel, dkdv_kernel): the instantiation for calls without a bias
// or a mask, which then carries neither their code nor their registers.
template <class Tr, bool kGeneral>
__device__ __forceinline__ void dq_body(const Params& p, int qtile, int n, int b,
                                        typename Tr::T* sK, typename Tr::T* sV,
                                        typename Tr::T* sQ, typename Tr::T* sdO) {
  using T = typename Tr::T;
  constexpr int D = Tr::D, BC = Tr::BC, BR = Tr::BR, ST = Tr::kStride, MT = Tr::MT;
  constexpr int KT = D / 16, NTS = BC / 8, NTO = D / 8, R = 2 * MT;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int kh = n / p.hpk;
  const int t0 = qtile * BR;
  const int wr0 = t0 + warp * 16 * MT;
  const RowLimits L = make_limits(p, b);
  int rows[R], lims[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    rows[r] = wr0 + 8 * r + g;
    lims[r] = L(rows[r]);
  }
  const int warp_min_lim = min(L(wr0), L(wr0 + 16 * MT - 1));
  const int cta_last = min(t0 + BR, L.qlen) - 1;
  const int kv_end = cta_last >= t0 ? L(cta_last) : 0;
  const int ntiles = (kv_end + BC - 1) / BC;

  const int64_t qrow = int64_t(p.N) * D, krow = int64_t(p.KH) * D;
  const int64_t qoff = int64_t(b) * p.T * qrow + int64_t(n) * D;
  const T* kb = static_cast<const T*>(p.k) + int64_t(b) * p.S * krow + int64_t(kh) * D;
  const T* vb = static_cast<const T*>(p.v) + int64_t(b) * p.S * krow + int64_t(kh) * D;

  load_tile<BR, D, Tr::kThreads>(sQ, static_cast<const T*>(p.q) + qoff, qrow, t0, p.T, tid);
  load_tile<BR, D, Tr::kThreads>(sdO, static_cast<const T*>(p.dout) + qoff, qrow, t0, p.T, tid);
  if (ntiles > 0) {
    load_tile<BC, D, Tr::kThreads>(sK, kb, krow, 0, p.S, tid);
    load_tile<BC, D, Tr::kThreads>(sV, vb, krow, 0, p.S, tid);
  }
  cp_async_commit();

  const int64_t rows_total = int64_t(p.B) * p.N * p.T;
  const float* delta = static_cast<const float*>(p.workspace);
  const float* lse2 = delta + rows_total;
  float rl[R], rd[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t ri = (int64_t(b) * p.N + n) * p.T + min(rows[r], p.T - 1);
    rl[r] = lse2[ri];
    rd[r] = delta[ri];
  }
  // bias / dbias / mask rows are addressed on use (only for valid elements, hence t < T)
  const int64_t bias_bn = int64_t(b) * p.bias_sb + int64_t(n) * p.bias_sn;
  const int64_t mask_bn = int64_t(b) * p.mask_sb + int64_t(n) * p.mask_sn;
  const float c2 = p.scale[n] * kLog2e;
  const T* q_s = sQ + warp * 16 * MT * ST;
  const T* o_s = sdO + warp * 16 * MT * ST;

  float dqacc[MT][NTO][4];
#pragma unroll
  for (int m = 0; m < MT; ++m) zero_acc(dqacc[m]);

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
    const T* k_s = sK + stage * Tr::kStageElems;
    const T* v_s = sV + stage * Tr::kStageElems;

    float sacc[MT][NTS][4], dpacc[MT][NTS][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      zero_acc(sacc[m]);
      zero_acc(dpacc[m]);
    }
    mgemm_sA_nt<MT, KT, NTS>(sacc, q_s, k_s, ST, lane);   // S = Q K^T
    mgemm_sA_nt<MT, KT, NTS>(dpacc, o_s, v_s, ST, lane);  // dP = dO V^T

    const bool need_check = (s0 + BC > warp_min_lim) || (kGeneral && p.mask != nullptr);
    auto body = [&](auto check, auto bias) {
      constexpr bool CHECK = decltype(check)::value, BIAS = decltype(bias)::value;
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NTS; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = 2 * m + (e >> 1);
            const int s = s0 + 8 * j + 2 * c + (e & 1);
            bool ok = true;
            if constexpr (CHECK) {
              ok = s < lims[r];
              if (kGeneral && ok && p.mask)
                ok = p.mask[mask_bn + int64_t(rows[r]) * p.mask_st + s * p.mask_ss] != 0;
            }
            float x = sacc[m][j][e] * c2;
            const int64_t bidx = bias_bn + int64_t(rows[r]) * p.bias_st + s * p.bias_ss;
            if constexpr (BIAS) {
              if (ok) x = fmaf(p.bias[bidx], kLog2e, x);
            }
            float pv = ex2(x - rl[r]);
            if constexpr (CHECK) pv = ok ? pv : 0.f;
            const float ds = pv * (dpacc[m][j][e] - rd[r]);
            if constexpr (BIAS) {
              if (p.dbias_mode != DBiasMode::kNone && ok) {
                float* dst = p.dbias + bidx;
                if (p.dbias_mode == DBiasMode::kStore) *dst = ds;
                else if (p.dbias_mode == DBiasMode::kAtomic) atomicAdd(dst, ds);
                else *dst += ds;
              }
            }
            sacc[m][j][e] = ds;
          }
    };
    dispatch2(need_check, kGeneral && p.bias != nullptr, body);

    uint32_t dsf[MT][NTS / 2][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc_to_a<NTS, T>(dsf[m], sacc[m]);
    mgemm_rB_t<MT, NTS / 2, NTO>(dqacc, dsf, k_s, ST, lane);  // dQ += dS K
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();  // the next (ordered-mode) body reuses sQ / sdO

  float* dqb = p.dq_acc + qoff;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (rows[r] < p.T) {
      float2* drow = reinterpret_cast<float2*>(dqb + int64_t(rows[r]) * qrow);
      const int m = r >> 1, h = r & 1;
#pragma unroll
      for (int j = 0; j < NTO; ++j)
        drow[4 * j + c] = make_float2(dqacc[m][j][2 * h], dqacc[m][j][2 * h + 1]);
    }
  }
}

// grid (qtiles, N or 1, B or 1). In DBiasMode::kOrdered, a CTA loops over the heads (if the bias
// is broadcast over N) and batches (if broadcast over B) in a fixed order.
template <class Tr, bool kGeneral>
__global__ void __launch_bounds__(Tr::kThreads) dq_kernel(const Params p) {
  using T = typename Tr::T;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + 2 * Tr::kStageElems;
  T* sQ = sV + 2 * Tr::kStageElems;
  T* sdO = sQ + Tr::kQElems;
  const bool ordered = kGeneral && p.dbias_mode == DBiasMode::kOrdered;
  const bool loop_n = ordered && p.bias_dims[1] == 1;
  const bool loop_b = ordered && p.bias_dims[0] == 1;
  const int nb = loop_b ? 0 : blockIdx.z, ne = loop_b ? p.B : blockIdx.z + 1;
  const int n_b = loop_n ? 0 : blockIdx.y, n_e = loop_n ? p.N : blockIdx.y + 1;
  for (int b = nb; b < ne; ++b)
    for (int n = n_b; n < n_e; ++n) dq_body<Tr, kGeneral>(p, blockIdx.x, n, b, sK, sV, sQ, sdO);
}

template <int D_, int NW_, int MT_, int BRQ_, int MINB_, typename T_>
struct DkvTraits {
  using T = T_;
  static constexpr int D = D_, NW = NW_, MT = MT_, BRQ = BRQ_;
  static constexpr int BCK = 16 * MT * NW;  // keys per CTA, 16*MT per warp
  static constexpr int kThreads = 32 * NW;
  static constexpr int kStride = D + 8;
  static constexpr int kKV = BCK * kStride;    // one K (or V) tile
  static constexpr int kQS = BRQ * kStride;    // one Q (or dO) stage
  // dS^T staging for the fused dQ product: [BCK keys][BRQ + 8] (padded)
  static constexpr int kDSStride = BRQ + 8;
  static constexpr int kDS = BCK * kDSStride;
  static constexpr size_t kSmem = (size_t(2) * kKV + size_t(4) * kQS + size_t(kDS)) * sizeof(T) +
                                  size_t(4) * BRQ * sizeof(float);
  // warps of the fused dQ product: WM along the BRQ query rows (16 each) x WN along D
  static constexpr int kWM = BRQ / 16 < NW ? BRQ / 16 : NW;
  static constexpr int kWN = NW / kWM;
  static constexpr int kMinBlocks = MINB_;  // __launch_bounds__ min blocks per SM
};

template <class Tr, bool kGeneral>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) dkdv_kernel(const Params p) {
  using T = typename Tr::T;
  using Op = MmaOp<T>;
  constexpr int D = Tr::D, BRQ = Tr::BRQ, BCK = Tr::BCK, ST = Tr::kStride, MT = Tr::MT;
  constexpr int KT = D / 16, NTQ = BRQ / 8, NTO = D / 8, R = 2 * MT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + Tr::kKV;
  T* sQ = sV + Tr::kKV;        // [2][BRQ][ST]
  T* sO = sQ + 2 * Tr::kQS;    // dO, [2][BRQ][ST]
  float* sL = reinterpret_cast<float*>(sO + 2 * Tr::kQS);  // lse2 [2][BRQ]
  float* sDl = sL + 2 * BRQ;                                // delta [2][BRQ]
  T* sDS = reinterpret_cast<T*>(sDl + 2 * BRQ);             // dS^T [BCK][BRQ+8] (fused dQ)

  const int ktile = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int s0 = ktile * BCK;
  const int wk0 = warp * 16 * MT;  // first key row of this warp within the tile
  const RowLimits L = make_limits(p, b);

  const int64_t qrow = int64_t(p.N) * D, krow = int64_t(p.KH) * D;
  const int64_t koff = int64_t(b) * p.S * krow + int64_t(kh) * D;
  const T* qbase = static_cast<const T*>(p.q) + int64_t(b) * p.T * qrow;
  const T* dobase = static_cast<const T*>(p.dout) + int64_t(b) * p.T * qrow;
  const int64_t rows_total = int64_t(p.B) * p.N * p.T;
  const float* delta = static_cast<const float*>(p.workspace);
  const float* lse2 = delta + rows_total;

  int qt_begin, nq;
  L.query_tiles(s0, BRQ, qt_begin, nq);
  const int total = p.hpk * nq;

  const QuerySteps steps{qt_begin * BRQ, (qt_begin + nq) * BRQ, BRQ};
  auto prefetch = [&](QueryStep st, int stage) {
    const int n = st.n, tq0 = st.tq0;
    load_tile<BRQ, D, Tr::kThreads>(sQ + stage * Tr::kQS, qbase + int64_t(n) * D, qrow, tq0, p.T,
                                    tid);
    load_tile<BRQ, D, Tr::kThreads>(sO + stage * Tr::kQS, dobase + int64_t(n) * D, qrow, tq0, p.T,
                                    tid);
    load_row_stats<BRQ, Tr::kThreads>(sL + stage * BRQ, sDl + stage * BRQ, lse2, delta,
                                      (int64_t(b) * p.N + n) * p.T, tq0, p.T, tid);
  };

  if (total > 0) {
    load_tile<BCK, D, Tr::kThreads>(sK, static_cast<const T*>(p.k) + koff, krow, s0, p.S, tid);
    load_tile<BCK, D, Tr::kThreads>(sV, static_cast<const T*>(p.v) + koff, krow, s0, p.S, tid);
    prefetch(steps.first(kh * p.hpk), 0);
    cp_async_commit();
  }

  float dkacc[MT][NTO][4], dvacc[MT][NTO][4];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    zero_acc(dkacc[m]);
    zero_acc(dvacc[m]);
  }
  int srow[R];  // key index of accumulator row r = 2m + h
#pragma unroll
  for (int r = 0; r < R; ++r) srow[r] = s0 + wk0 + 8 * r + g;

  // Each step's scale is loaded a step ahead (a load right before its use stalls every step).
  QueryStep cur = steps.first(kh * p.hpk);
  float sc_next = p.scale[cur.n];
  for (int it = 0; it < total; ++it) {
    const int stage = it & 1;
    const QueryStep nxt = steps.next(cur);
    if (it + 1 < total) {
      prefetch(nxt, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int n = cur.n, tq0 = cur.tq0;
    const float sc = sc_next;
    const float c2 = sc * kLog2e;
    if (it + 1 < total) sc_next = p.scale[nxt.n];
    const T* q_s = sQ + stage * Tr::kQS;
    const T* o_s = sO + stage * Tr::kQS;
    const float* l_s = sL + stage * BRQ;
    const float* d_s = sDl + stage * BRQ;

    float sacc[MT][NTQ][4], dpacc[MT][NTQ][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      zero_acc(sacc[m]);
      zero_acc(dpacc[m]);
    }
    mgemm_sA_nt<MT, KT, NTQ>(sacc, sK + wk0 * ST, q_s, ST, lane);   // S^T = K Q^T
    mgemm_sA_nt<MT, KT, NTQ>(dpacc, sV + wk0 * ST, o_s, ST, lane);  // dP^T = V dO^T

    const bool need_check = (kGeneral && p.mask != nullptr) || tq0 + BRQ > L.qlen || s0 + BCK > L.kvlen ||
                            (p.causal && s0 + BCK - 1 > tq0 + p.S - p.T);
    const int64_t bo = b * p.bias_sb + n * p.bias_sn;
    const int64_t mo = b * p.mask_sb + n * p.mask_sn;
    auto body = [&](auto check, auto bias) {
      constexpr bool CHECK = decltype(check)::value, BIAS = decltype(bias)::value;
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NTQ; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int s = srow[2 * m + (e >> 1)];
            const int tl = 8 * j + 2 * c + (e & 1);
            const int t = tq0 + tl;
            bool ok = true;
            if constexpr (CHECK) {
              ok = t < L.qlen && s < L.kvlen && (!p.causal || s <= t + p.S - p.T);
              if (kGeneral && ok && p.mask) ok = p.mask[mo + t * p.mask_st + s * p.mask_ss] != 0;
            }
            float x = sacc[m][j][e] * c2;
            if constexpr (BIAS) {
              if (ok) x = fmaf(p.bias[bo + t * p.bias_st + s * p.bias_ss], kLog2e, x);
            }
            float pv = ex2(x - l_s[tl]);
            if constexpr (CHECK) pv = ok ? pv : 0.f;
            const float ds = pv * (dpacc[m][j][e] - d_s[tl]);
            sacc[m][j][e] = pv;
            dpacc[m][j][e] = ds;
          }
    };
    dispatch2(need_check, kGeneral && p.bias != nullptr, body);
    if (p.fuse_dq) {  // stage unscaled dS^T (keys x queries) for dQ += dS K
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NTQ; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            *reinterpret_cast<uint32_t*>(sDS + (wk0 + 16 * m + g + 8 * h) * Tr::kDSStride +
                                         8 * j + 2 * c) =
                Op::pack(dpacc[m][j][2 * h], dpacc[m][j][2 * h + 1]);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < NTQ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dpacc[m][j][e] *= sc;
    uint32_t pf[MT][NTQ / 2][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc_to_a<NTQ, T>(pf[m], sacc[m]);
    mgemm_rB_t<MT, NTQ / 2, NTO>(dvacc, pf, o_s, ST, lane);  // dV += P^T dO
#pragma unroll
    for (int m = 0; m < MT; ++m) acc_to_a<NTQ, T>(pf[m], dpacc[m]);
    mgemm_rB_t<MT, NTQ / 2, NTO>(dkacc, pf, q_s, ST, lane);  // dK += (scale dS)^T Q
    if (p.fuse_dq) {
      __syncthreads();  // dS^T of all warps staged
      // dQ[tq0 + m0 .. +16, n0 .. n0 + D/WN] += dS[rows, keys] K[keys, cols]; A = dS read
      // transposed from the [key][query] staging buffer, B = K [key][d] (transposed ldmatrix).
      constexpr int NQ = D / Tr::kWN / 8, KQ = BCK / 16;
      static_assert(NQ % 2 == 0 && NQ > 0, "fused dQ: each warp needs an even number of n8 tiles");
      const int m0 = (warp % Tr::kWM) * 16, n0 = (warp / Tr::kWM) * (D / Tr::kWN);
      const int mat = lane >> 3, rr = lane & 7;
      float qacc[NQ][4];
      zero_acc(qacc);
#pragma unroll
      for (int kk = 0; kk < KQ; ++kk) {
        uint32_t a[4];
        ldsm_x4_t(a, sDS + (16 * kk + (mat >> 1) * 8 + rr) * Tr::kDSStride + m0 + (mat & 1) * 8);
#pragma unroll
        for (int j = 0; j < NQ; j += 2) {
          uint32_t bq[4];
          ldsm_x4_t(bq, sK + (16 * kk + (mat & 1) * 8 + rr) * ST + n0 + 8 * j + (mat >> 1) * 8);
          Op::run(qacc[j], a, bq[0], bq[1]);
          Op::run(qacc[j + 1], a, bq[2], bq[3]);
        }
      }
      float* dqb = p.dq_acc + (int64_t(b) * p.T) * qrow + int64_t(n) * D;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int t = tq0 + m0 + g + 8 * h;
        if (t < p.T) {
          float* row = dqb + int64_t(t) * qrow + n0 + 2 * c;
#pragma unroll
          for (int j = 0; j < NQ; ++j) red_add2(row + 8 * j, qacc[j][2 * h], qacc[j][2 * h + 1]);
        }
      }
    }
    __syncthreads();
    cur = nxt;
  }

  T* dkb = static_cast<T*>(p.dk) + koff;
  T* dvb = static_cast<T*>(p.dv) + koff;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (srow[r] < p.S) {
      uint32_t* kr = reinterpret_cast<uint32_t*>(dkb + int64_t(srow[r]) * krow);
      uint32_t* vr = reinterpret_cast<uint32_t*>(dvb + int64_t(srow[r]) * krow);
      const int m = r >> 1, h = r & 1;
#pragma unroll
      for (int j = 0; j < NTO; ++j) {
        kr[4 * j + c] = Op::pack(dkacc[m][j][2 * h], dkacc[m][j][2 * h + 1]);
        vr[4 * j + c] = Op::pack(dvacc[m][j][2 * h], dvacc[m][j][2 * h + 1]);
      }
    }
  }
}

}  // namespace jca
