// Building blocks shared by the forward and backward kernels: tile loads, warp-level GEMMs on
// mma.sync fragments, masking helpers.
//
// Fragment conventions (m16n8k16, one warp; g = lane / 4, c = lane % 4):
//   A (16x16):   a0 = (row g,   cols 2c,2c+1)   a1 = (row g+8, cols 2c,2c+1)
//                a2 = (row g,   cols 2c+8,+9)   a3 = (row g+8, cols 2c+8,+9)
//   B (16x8):    b0 = (k 2c,2c+1, col g)        b1 = (k 2c+8,2c+9, col g)
//   C (16x8 f32): c0,c1 = (row g, cols 2c,2c+1)  c2,c3 = (row g+8, cols 2c,2c+1)
// A 16xN accumulator (N/8 C tiles) converts to N/16 A fragments of the next product without any
// data movement (FA2's register-reuse trick): see acc_to_a().
#pragma once
#include <climits>

#include "ptx.cuh"
#include "jca.h"

namespace jca {

// Stage the lse2 and delta values of query rows t0.. (ROWS of them; row_base = the (b, n) row
// offset of the [B,N,T] workspace arrays) into sL / sD; rows >= T are zero-filled.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_row_stats(float* sL, float* sD, const float* lse2,
                                               const float* delta, int64_t row_base, int t0,
                                               int T, int tid) {
  // Trip count known at compile time (a loop from tid is not: it compiles to a rolled loop with
  // a branch per element, which ncu counted at ~10x FA2's branches per step).
#pragma unroll
  for (int it = 0; it < (2 * ROWS + THREADS - 1) / THREADS; ++it) {
    const int i = tid + it * THREADS;
    if ((2 * ROWS) % THREADS == 0 || i < 2 * ROWS) {
      const int r = i % ROWS;
      const bool ok = t0 + r < T;
      const float* src = (i < ROWS ? lse2 : delta) + (ok ? row_base + t0 + r : 0);
      cp_async4((i < ROWS ? sL : sD) + r, src, ok);
    }
  }
}

// Copy a [ROWS x D] tile (rows r0.. of a row-major tensor whose rows are `gstride` elements
// apart) into padded smem [ROWS][D+8]. Rows >= nrows are zero-filled.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gbase, int64_t gstride, int r0,
                                          int nrows, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kStride = D + 8;
  constexpr int kTotal = ROWS * kChunks;
  constexpr int kIters = (kTotal + THREADS - 1) / THREADS;
  if constexpr (THREADS % kChunks == 0) {
    // Compile-time trip count, and a thread's chunk column is the same in every iteration: one
    // row pointer advanced by a fixed number of rows (a loop from tid compiled to a rolled loop
    // with a branch per chunk: ncu counted ~10x FA2's branches per step).
    constexpr int kRowStep = THREADS / kChunks;
    const int r = tid / kChunks, ch = tid % kChunks;
    const T* src = gbase + (int64_t)(r0 + r) * gstride + ch * 8;
    T* dst = smem + r * kStride + ch * 8;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (kTotal % THREADS == 0 || r + it * kRowStep < ROWS) {
        const bool ok = r0 + r + it * kRowStep < nrows;
        cp_async16(dst + it * kRowStep * kStride, ok ? src : gbase, ok);
      }
      src += kRowStep * gstride;
    }
  } else {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = tid + it * THREADS;
      if (kTotal % THREADS == 0 || i < kTotal) {
        const int r = i / kChunks, ch = i % kChunks;
        const bool ok = (r0 + r) < nrows;
        const T* src = ok ? gbase + (int64_t)(r0 + r) * gstride + ch * 8 : gbase;
        cp_async16(smem + r * kStride + ch * 8, src, ok);
      }
    }
  }
}

// acc[16 x 8NT] += A[16 x 16KT] (registers) * B, B^T stored in smem as [8NT rows][16KT cols]
// (row stride `st` elements), i.e. smem rows index the n dimension (non-transposed ldmatrix).
template <int KT, int NT, typename T>
__device__ __forceinline__ void gemm_rB_nt(float (&acc)[NT][4], const uint32_t (&a)[KT][4],
                                           const T* sB, int st, int lane) {
  static_assert(NT % 2 == 0, "NT must be even");
  const int mat = lane >> 3, rr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      ldsm_x4(b, sB + (8 * j + (mat >> 1) * 8 + rr) * st + 16 * kk + (mat & 1) * 8);
      MmaOp<T>::run(acc[j], a[kk], b[0], b[1]);
      MmaOp<T>::run(acc[j + 1], a[kk], b[2], b[3]);
    }
  }
}

// acc[16 x 8NT] += A[16 x 16KT] (registers) * B, B stored in smem as [16KT rows (k)][8NT cols]
// (row stride `st`), i.e. smem rows index the k dimension (transposed ldmatrix).
template <int KT, int NT, typename T>
__device__ __forceinline__ void gemm_rB_t(float (&acc)[NT][4], const uint32_t (&a)[KT][4],
                                          const T* sB, int st, int lane) {
  static_assert(NT % 2 == 0, "NT must be even");
  const int mat = lane >> 3, rr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      ldsm_x4_t(b, sB + (16 * kk + (mat & 1) * 8 + rr) * st + 8 * j + (mat >> 1) * 8);
      MmaOp<T>::run(acc[j], a[kk], b[0], b[1]);
      MmaOp<T>::run(acc[j + 1], a[kk], b[2], b[3]);
    }
  }
}

// acc[16 x 8NT] += A * B with A = 16 rows of smem sA ([16][16KT], row stride st) and B^T in smem
// as in gemm_rB_nt. A fragments are loaded per k-step (keeps registers free).
template <int KT, int NT, typename T>
__device__ __forceinline__ void gemm_sA_nt(float (&acc)[NT][4], const T* sA, const T* sB, int st,
                                           int lane) {
  const int mat = lane >> 3, rr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, sA + ((mat & 1) * 8 + rr) * st + 16 * kk + (mat >> 1) * 8);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      ldsm_x4(b, sB + (8 * j + (mat >> 1) * 8 + rr) * st + 16 * kk + (mat & 1) * 8);
      MmaOp<T>::run(acc[j], a, b[0], b[1]);
      MmaOp<T>::run(acc[j + 1], a, b[2], b[3]);
    }
  }
}

// Pack a 16 x 8NT f32 accumulator into NT/2 A fragments (k = the accumulator's columns).
template <int NT, typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[NT / 2][4], const float (&acc)[NT][4]) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    a[kk][0] = MmaOp<T>::pack(acc[2 * kk][0], acc[2 * kk][1]);
    a[kk][1] = MmaOp<T>::pack(acc[2 * kk][2], acc[2 * kk][3]);
    a[kk][2] = MmaOp<T>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[kk][3] = MmaOp<T>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
}

// Load a warp's 16-row A operand [16 x 16KT] straight from global memory (rows >= nrows -> 0).
template <int KT, typename T>
__device__ __forceinline__ void load_a_global(uint32_t (&a)[KT][4], const T* base, int64_t rstride,
                                              int r0, int nrows, int lane) {
  const int g = lane >> 2, c = lane & 3;
  const bool ok0 = r0 + g < nrows, ok1 = r0 + g + 8 < nrows;
  const uint32_t* p0 = reinterpret_cast<const uint32_t*>(base + (int64_t)(r0 + g) * rstride);
  const uint32_t* p1 = reinterpret_cast<const uint32_t*>(base + (int64_t)(r0 + g + 8) * rstride);
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    a[kk][0] = ok0 ? p0[8 * kk + c] : 0u;
    a[kk][1] = ok1 ? p1[8 * kk + c] : 0u;
    a[kk][2] = ok0 ? p0[8 * kk + c + 4] : 0u;
    a[kk][3] = ok1 ? p1[8 * kk + c + 4] : 0u;
  }
}

// ---- multi-row-tile variants: a warp owns MT stacked 16-row tiles; every B fragment loaded from
// smem feeds MT mma's (halves smem traffic per mma for MT = 2, as FA2's 32 rows per warp).

// acc[m][16 x 8NT] += A[m] (registers) * B, B^T stored [8NT rows][16KT cols] (non-transposed).
template <int MT, int KT, int NT, typename T>
__device__ __forceinline__ void mgemm_rB_nt(float (&acc)[MT][NT][4], const uint32_t (&a)[MT][KT][4],
                                            const T* sB, int st, int lane) {
  const int mat = lane >> 3, rr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      ldsm_x4(b, sB + (8 * j + (mat >> 1) * 8 + rr) * st + 16 * kk + (mat & 1) * 8);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        MmaOp<T>::run(acc[m][j], a[m][kk], b[0], b[1]);
        MmaOp<T>::run(acc[m][j + 1], a[m][kk], b[2], b[3]);
      }
    }
  }
}

// Same with A = MT*16 rows of smem sA ([rows][16KT], stride st) loaded per k-step.
template <int MT, int KT, int NT, typename T>
__device__ __forceinline__ void mgemm_sA_nt(float (&acc)[MT][NT][4], const T* sA, const T* sB,
                                            int st, int lane) {
  const int mat = lane >> 3, rr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
      ldsm_x4(a[m], sA + (16 * m + (mat & 1) * 8 + rr) * st + 16 * kk + (mat >> 1) * 8);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      ldsm_x4(b, sB + (8 * j + (mat >> 1) * 8 + rr) * st + 16 * kk + (mat & 1) * 8);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        MmaOp<T>::run(acc[m][j], a[m], b[0], b[1]);
        MmaOp<T>::run(acc[m][j + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// acc[m][16 x 8NT] += A[m] (registers) * B, B stored [16KT rows (k)][8NT cols] (transposed).
template <int MT, int KT, int NT, typename T>
__device__ __forceinline__ void mgemm_rB_t(float (&acc)[MT][NT][4], const uint32_t (&a)[MT][KT][4],
                                           const T* sB, int st, int lane) {
  const int mat = lane >> 3, rr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      ldsm_x4_t(b, sB + (16 * kk + (mat & 1) * 8 + rr) * st + 8 * j + (mat >> 1) * 8);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        MmaOp<T>::run(acc[m][j], a[m][kk], b[0], b[1]);
        MmaOp<T>::run(acc[m][j + 1], a[m][kk], b[2], b[3]);
      }
    }
  }
}

// acc[m][16 x 8NT] += A * B with both operands in smem: A (16MT rows x 16KT) stored row-major
// ([m][k], stride sta) or, kATrans, transposed ([k][m]); B stored [16KT rows (k)][8NT cols]
// (stride stb, transposed ldmatrix). kScaleA: every A fragment is multiplied by a_mul (two
// packed 16-bit values) before use.
template <int MT, int KT, int NT, bool kATrans, bool kScaleA = false, typename T>
__device__ __forceinline__ void mgemm_sA_sBt(float (&acc)[MT][NT][4], const T* sA, int sta,
                                             const T* sB, int stb, int lane, uint32_t a_mul = 0) {
  static_assert(NT % 2 == 0, "NT must be even");
  const int mat = lane >> 3, rr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if constexpr (kATrans)
        ldsm_x4_t(a[m], sA + (16 * kk + (mat >> 1) * 8 + rr) * sta + 16 * m + (mat & 1) * 8);
      else
        ldsm_x4(a[m], sA + (16 * m + (mat & 1) * 8 + rr) * sta + 16 * kk + (mat >> 1) * 8);
      if constexpr (kScaleA) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[m][i] = MmaOp<T>::mul2(a[m][i], a_mul);
      }
    }
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      ldsm_x4_t(b, sB + (16 * kk + (mat & 1) * 8 + rr) * stb + 8 * j + (mat >> 1) * 8);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        MmaOp<T>::run(acc[m][j], a[m], b[0], b[1]);
        MmaOp<T>::run(acc[m][j + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// Compile-time bool for generic lambdas: uniform run-time flags dispatch to specialised loops so
// the per-element code carries no checks it does not need.
template <bool B>
struct BoolC {
  static constexpr bool value = B;
};
template <class F>
__device__ __forceinline__ void dispatch2(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(BoolC<true>{}, BoolC<true>{});
    else f(BoolC<true>{}, BoolC<false>{});
  } else {
    if (b) f(BoolC<false>{}, BoolC<true>{});
    else f(BoolC<false>{}, BoolC<false>{});
  }
}

template <int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// Number of keys (a prefix 0..lim-1) query row t may attend, before the dense mask.
struct RowLimits {
  int T, S, qlen, kvlen;
  bool causal;
  __host__ __device__ __forceinline__ int operator()(int t) const {
    if (t >= qlen) return 0;
    int l = kvlen;
    if (causal) l = min(l, t + S - T + 1);
    return max(l, 0);
  }
  // First query row that may attend key s (causal), else 0.
  __host__ __device__ __forceinline__ int first_row(int s) const {
    return causal ? max(0, s - (S - T)) : 0;
  }
  // The rows that see key s are [first_seeing_row(s), qlen) (none past kvlen): the same test as
  // s < (*this)(t), with one per-key bound instead of the per-row min / max.
  __host__ __device__ __forceinline__ int first_seeing_row(int s) const {
    return s < kvlen ? first_row(s) : INT_MAX;
  }
  // The query tiles (of `rows` rows) that can see a key of the key tile starting at s0:
  // [begin, begin + count); count is 0 when the tile holds no valid key or no row is valid.
  __host__ __device__ __forceinline__ void query_tiles(int s0, int rows, int& begin,
                                                       int& count) const {
    begin = 0;
    count = 0;
    if (s0 < kvlen && qlen > 0) {
      begin = first_row(s0) / rows;
      count = max(0, (qlen + rows - 1) / rows - begin);
    }
  }
};

// The steps of a dK/dV CTA: query head n over the kv head's group (outer), query tiles of
// `rows` rows starting at tq0 in [tq_begin, tq_end) (inner); walked without a division per step.
struct QueryStep {
  int n, tq0;
};
struct QuerySteps {
  int tq_begin, tq_end, rows;
  __device__ __forceinline__ QueryStep first(int n0) const { return {n0, tq_begin}; }
  __device__ __forceinline__ QueryStep next(QueryStep s) const {
    s.tq0 += rows;
    if (s.tq0 == tq_end) {
      s.tq0 = tq_begin;
      ++s.n;
    }
    return s;
  }
};

// Whether every query head of kv head kh's GQA group has the same scale: the dK/dV kernels then
// scale dK once at the end instead of every dS^T element per step (as exact: the unscaled dS is
// rounded to 16 bits either way).
__device__ __forceinline__ bool group_shares_scale(const Params& p, int kh) {
  bool one = true;
  for (int i = 1; i < p.hpk; ++i) one &= p.scale[kh * p.hpk + i] == p.scale[kh * p.hpk];
  return one;
}

__device__ __forceinline__ RowLimits make_limits(const Params& p, int b) {
  RowLimits L;
  L.T = p.T;
  L.S = p.S;
  L.qlen = p.q_len ? min(max(p.q_len[b], 0), p.T) : p.T;
  L.kvlen = p.kv_len ? min(max(p.kv_len[b], 0), p.S) : p.S;
  L.causal = p.causal;
  return L;
}

}  // namespace jca
