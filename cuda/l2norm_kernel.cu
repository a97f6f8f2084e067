// Fused l2 normalisation of the last axis (see l2norm.h for the maths).
//
// Layout: a team of TPR = 2^k lanes (TPR <= 32, so a team never straddles a warp) per row; lane t
// of the team holds the E = 8 * VPT contiguous elements [t*E, (t+1)*E) of the row (VPT 16-byte
// loads), so one pass reads x (and dy) once and writes y (dx) once. Lanes with t*E >= h (h = 96:
// 12 of 16 lanes work) and teams past the last row only take part in the shuffles.
// Group sums, in f32: an in-register butterfly over the thread's E elements (groups of up to E
// elements), then, for groups spanning tpg = gsize / E lanes, a segmented shfl_down tree (any tpg,
// not only powers of two) whose total the group's first lane broadcasts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <algorithm>
#include <cstdlib>

#include "l2norm.h"
#include "l2norm_math.cuh"

namespace jca {
namespace {

constexpr int kThreads = 256;
constexpr int kDefaultRows = 2;  // rows per team (see RowsPerTeam)
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
struct Cvt;
template <>
struct Cvt<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_f2(T2 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ T2 from_f2(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <>
struct Cvt<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ float2 to_f2(T2 v) { return __half22float2(v); }
  static __device__ __forceinline__ T2 from_f2(float a, float b) { return __floats2half2_rn(a, b); }
};

// E = 8 * VPT contiguous elements starting at p (16-byte aligned) -> f32.
template <typename T, int VPT>
__device__ __forceinline__ void load_row_chunk(const T* p, float (&f)[8 * VPT]) {
  using C = Cvt<T>;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const uint4 u = reinterpret_cast<const uint4*>(p)[v];
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      typename C::T2 h2;
      *reinterpret_cast<uint32_t*>(&h2) = w[i];
      const float2 x2 = C::to_f2(h2);
      f[8 * v + 2 * i] = x2.x;
      f[8 * v + 2 * i + 1] = x2.y;
    }
  }
}

template <typename T, int VPT>
__device__ __forceinline__ void store_row_chunk(T* p, const float (&f)[8 * VPT]) {
  using C = Cvt<T>;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      typename C::T2 h2 = C::from_f2(f[8 * v + 2 * i], f[8 * v + 2 * i + 1]);
      w[i] = *reinterpret_cast<uint32_t*>(&h2);
    }
    reinterpret_cast<uint4*>(p)[v] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// s[j] <- sum of s over j's group of min(gsize, E) elements (gsize a power of two when < E).
// Both partners of each step get the same (commutative) sum, so every element of a group ends
// with the identical value.
template <int E>
__device__ __forceinline__ void butterfly(float (&s)[E], int gsize) {
#pragma unroll
  for (int m = 1; m < E; m <<= 1) {
    if (m < gsize) {
#pragma unroll
      for (int j = 0; j < E; ++j) {
        if ((j & m) == 0) {
          const float a = s[j] + s[j | m];
          s[j] = a;
          s[j | m] = a;
        }
      }
    }
  }
}

// Sum of p over the tpg consecutive lanes of this lane's group (tg = index in the group), the
// same value on every lane of the group. Warp-uniform control flow (tpg is kernel-uniform).
__device__ __forceinline__ float group_sum(float p, int tpg, int tg, int lane) {
  for (int off = 1; off < tpg; off <<= 1) {
    const float o = __shfl_down_sync(kFull, p, off);
    if (tg + off < tpg) p += o;
  }
  return __shfl_sync(kFull, p, lane - tg);
}

// This thread's place in the layout (see the top of the file): lane t of its team, the team's
// first row, and, for groups spanning lanes, the group size tpg in lanes and this lane's index tg.
struct Team {
  int lane, t, teams, tpg, tg;
  int64_t base;
  bool col_ok;  // the team's lane t holds columns of the row (t * E < h)
  __device__ __forceinline__ int64_t row(int i) const { return base + int64_t(i) * teams; }
};
template <int E, int ROWS, bool SMALL>
__device__ __forceinline__ Team team_of(int h, int tpr_log2, int gsize) {
  Team m;
  m.lane = threadIdx.x & 31;
  m.t = m.lane & ((1 << tpr_log2) - 1);
  m.teams = kThreads >> tpr_log2;
  m.base = int64_t(blockIdx.x) * m.teams * ROWS + (threadIdx.x >> tpr_log2);
  m.col_ok = m.t * E < h;
  m.tpg = SMALL ? 1 : gsize / E;
  m.tg = SMALL ? 0 : m.t % m.tpg;
  return m;
}

// Each team of 2^tpr_log2 lanes handles ROWS rows, kThreads >> tpr_log2 rows apart (so that each
// of the ROWS steps of a warp touches contiguous memory); all loads are issued before any math.
// SMALL: groups of fewer than E elements (inside one lane, per-element norms); otherwise each
// lane sums its E squares and the group's lanes add their partial sums (group_sum), and the
// row is scaled by one reciprocal per group.
template <typename T, int VPT, int ROWS, bool SMALL>
__global__ void __launch_bounds__(kThreads)
    l2norm_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int h,
                      int tpr_log2, int gsize, float eps2) {
  constexpr int E = 8 * VPT;
  const Team tm = team_of<E, ROWS, SMALL>(h, tpr_log2, gsize);

  float v[ROWS][E];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t row = tm.row(i);
    if (tm.col_ok && row < rows) {
      load_row_chunk<T, VPT>(x + row * h + int64_t(tm.t) * E, v[i]);
    } else {
#pragma unroll
      for (int j = 0; j < E; ++j) v[i][j] = 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t row = tm.row(i);
    if (SMALL) {
      float s[E];
#pragma unroll
      for (int j = 0; j < E; ++j) s[j] = v[i][j] * v[i][j];
      butterfly<E>(s, gsize);
#pragma unroll
      for (int j = 0; j < E; ++j) v[i][j] = v[i][j] / sqrtf(clamp_sq(s[j], eps2));
    } else {
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < E; ++j) part = fmaf(v[i][j], v[i][j], part);
      if (tm.tpg > 1) part = group_sum(part, tm.tpg, tm.tg, tm.lane);
      const float inv = 1.f / sqrtf(clamp_sq(part, eps2));
#pragma unroll
      for (int j = 0; j < E; ++j) v[i][j] *= inv;
    }
    if (tm.col_ok && row < rows) store_row_chunk<T, VPT>(y + row * h + int64_t(tm.t) * E, v[i]);
  }
}

template <typename T, int VPT, int ROWS, bool SMALL>
__global__ void __launch_bounds__(kThreads)
    l2norm_bwd_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                      int64_t rows, int h, int tpr_log2, int gsize, float eps2) {
  constexpr int E = 8 * VPT;
  const Team tm = team_of<E, ROWS, SMALL>(h, tpr_log2, gsize);

  float v[ROWS][E], d[ROWS][E];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t row = tm.row(i);
    if (tm.col_ok && row < rows) {
      load_row_chunk<T, VPT>(x + row * h + int64_t(tm.t) * E, v[i]);
      load_row_chunk<T, VPT>(dy + row * h + int64_t(tm.t) * E, d[i]);
    } else {
#pragma unroll
      for (int j = 0; j < E; ++j) v[i][j] = d[i][j] = 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t row = tm.row(i);
    if (SMALL) {
      float s[E], p[E];
#pragma unroll
      for (int j = 0; j < E; ++j) {
        s[j] = v[i][j] * v[i][j];
        p[j] = v[i][j] * d[i][j];
      }
      butterfly<E>(s, gsize);
      butterfly<E>(p, gsize);
#pragma unroll
      for (int j = 0; j < E; ++j) {
        float a, b;
        bwd_coeffs(s[j], p[j], eps2, a, b);
        d[i][j] = fmaf(-b, v[i][j], a * d[i][j]);
      }
    } else {
      float ss = 0.f, pp = 0.f;
#pragma unroll
      for (int j = 0; j < E; ++j) {
        ss = fmaf(v[i][j], v[i][j], ss);
        pp = fmaf(v[i][j], d[i][j], pp);
      }
      if (tm.tpg > 1) {
        ss = group_sum(ss, tm.tpg, tm.tg, tm.lane);
        pp = group_sum(pp, tm.tpg, tm.tg, tm.lane);
      }
      float a, b;
      bwd_coeffs(ss, pp, eps2, a, b);
#pragma unroll
      for (int j = 0; j < E; ++j) d[i][j] = fmaf(-b, v[i][j], a * d[i][j]);
    }
    if (tm.col_ok && row < rows) store_row_chunk<T, VPT>(dx + row * h + int64_t(tm.t) * E, d[i]);
  }
}

int Vpt(int64_t h) { return h <= 256 ? 1 : (h <= 512 ? 2 : 4); }

int Log2Ceil(int64_t v) {
  int k = 0;
  while ((int64_t(1) << k) < v) ++k;
  return k;
}

// Rows per team (JCA_L2NORM_ROWS=1|2|4 overrides, read once; a tuning knob for benchmarks).
int RowsPerTeam() {
  static const int r = [] {
    const char* e = std::getenv("JCA_L2NORM_ROWS");
    const int v = e ? std::atoi(e) : 0;
    return (v == 1 || v == 2 || v == 4) ? v : kDefaultRows;
  }();
  return r;
}

struct Geometry {
  int vpt, tpr_log2, gsize, rows_per_team;
  bool small;
  unsigned blocks;
};

Geometry Geom(int64_t rows, int h, int groups) {
  Geometry g;
  g.vpt = Vpt(h);
  g.tpr_log2 = Log2Ceil(h / (8 * g.vpt));
  g.gsize = h / groups;
  g.small = g.gsize < 8 * g.vpt;
  // at most 4 vectors of x per lane and row set (more spills registers in the backward)
  g.rows_per_team = g.small ? 1 : std::min(RowsPerTeam(), 4 / g.vpt);
  const int64_t rows_per_block = int64_t(kThreads >> g.tpr_log2) * g.rows_per_team;
  g.blocks = unsigned((rows + rows_per_block - 1) / rows_per_block);
  return g;
}

// One block per (kThreads >> tpr_log2) teams; gridDim.x <= 2^31 - 1 at one row per team.
int64_t MaxRows(int h) {
  return ((int64_t(1) << 31) - 1) * (kThreads >> Log2Ceil(h / (8 * Vpt(h))));
}

bool Aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T, int VPT, int ROWS, bool SMALL>
void FwdAt(const Geometry& g, const void* x, void* y, int64_t rows, int h, float eps2,
           cudaStream_t stream) {
  l2norm_fwd_kernel<T, VPT, ROWS, SMALL><<<g.blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(y), rows, h, g.tpr_log2, g.gsize, eps2);
}

template <typename T, int VPT, int ROWS, bool SMALL>
void BwdAt(const Geometry& g, const void* x, const void* dy, void* dx, int64_t rows, int h,
           float eps2, cudaStream_t stream) {
  l2norm_bwd_kernel<T, VPT, ROWS, SMALL><<<g.blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dx), rows, h,
      g.tpr_log2, g.gsize, eps2);
}

// The (VPT, ROWS, SMALL) instance for the geometry: LAUNCH(V, R, S) is invoked once.
#define JCA_L2NORM_DISPATCH(g, LAUNCH)                          \
  do {                                                          \
    if ((g).vpt == 1) {                                         \
      if ((g).small) LAUNCH(1, 1, true);                        \
      else if ((g).rows_per_team == 1) LAUNCH(1, 1, false);     \
      else if ((g).rows_per_team == 2) LAUNCH(1, 2, false);     \
      else LAUNCH(1, 4, false);                                 \
    } else if ((g).vpt == 2) {                                  \
      if ((g).small) LAUNCH(2, 1, true);                        \
      else if ((g).rows_per_team == 1) LAUNCH(2, 1, false);     \
      else LAUNCH(2, 2, false);                                 \
    } else {                                                    \
      if ((g).small) LAUNCH(4, 1, true);                        \
      else LAUNCH(4, 1, false);                                 \
    }                                                           \
  } while (0)

template <typename T>
cudaError_t Fwd(const void* x, void* y, int64_t rows, int h, int groups, float eps,
                cudaStream_t stream) {
  const Geometry g = Geom(rows, h, groups);
  const float eps2 = eps * eps;
#define JCA_FWD(V, R, S) FwdAt<T, V, R, S>(g, x, y, rows, h, eps2, stream)
  JCA_L2NORM_DISPATCH(g, JCA_FWD);
#undef JCA_FWD
  return cudaGetLastError();
}

template <typename T>
cudaError_t Bwd(const void* x, const void* dy, void* dx, int64_t rows, int h, int groups,
                float eps, cudaStream_t stream) {
  const Geometry g = Geom(rows, h, groups);
  const float eps2 = eps * eps;
#define JCA_BWD(V, R, S) BwdAt<T, V, R, S>(g, x, dy, dx, rows, h, eps2, stream)
  JCA_L2NORM_DISPATCH(g, JCA_BWD);
#undef JCA_BWD
  return cudaGetLastError();
}

}  // namespace

bool L2NormSupported(int64_t h, int64_t groups) {
  if (h <= 0 || h % 8 != 0 || groups < 1 || h % groups != 0) return false;
  if (h > 1024 || (h > 512 && h % 32 != 0) || (h > 256 && h % 16 != 0)) return false;
  const int64_t e = 8 * Vpt(h), gsize = h / groups;
  return gsize % e == 0 || e % gsize == 0;
}

cudaError_t LaunchL2NormFwd(DType dtype, const void* x, void* y, int64_t rows, int h, int groups,
                            float eps, cudaStream_t stream) {
  if (!L2NormSupported(h, groups) || rows < 0 || !Aligned(x) || !Aligned(y))
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (rows > MaxRows(h)) return cudaErrorInvalidValue;
  return dtype == DType::kBF16 ? Fwd<__nv_bfloat16>(x, y, rows, h, groups, eps, stream)
                               : Fwd<__half>(x, y, rows, h, groups, eps, stream);
}

cudaError_t LaunchL2NormBwd(DType dtype, const void* x, const void* dy, void* dx, int64_t rows,
                            int h, int groups, float eps, cudaStream_t stream) {
  if (!L2NormSupported(h, groups) || rows < 0 || !Aligned(x) || !Aligned(dy) || !Aligned(dx))
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (rows > MaxRows(h)) return cudaErrorInvalidValue;
  return dtype == DType::kBF16 ? Bwd<__nv_bfloat16>(x, dy, dx, rows, h, groups, eps, stream)
                               : Bwd<__half>(x, dy, dx, rows, h, groups, eps, stream);
}

}  // namespace jca
