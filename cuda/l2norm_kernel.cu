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

#include "l2norm.h"

namespace jca {
namespace {

constexpr int kThreads = 256;
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

// n = sqrt(max(sumsq, eps^2)) with jnp.maximum's NaN propagation.
__device__ __forceinline__ float clamp_sq(float sumsq, float eps2) {
  return sumsq < eps2 ? eps2 : sumsq;
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kThreads)
    l2norm_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int h,
                      int tpr_log2, int gsize, float eps2) {
  constexpr int E = 8 * VPT;
  const int lane = threadIdx.x & 31;
  const int t = lane & ((1 << tpr_log2) - 1);
  const int64_t row = (int64_t(blockIdx.x) * kThreads + threadIdx.x) >> tpr_log2;
  const bool active = row < rows && t * E < h;
  const int64_t off = row * h + int64_t(t) * E;

  float v[E];
  if (active) {
    load_row_chunk<T, VPT>(x + off, v);
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) v[j] = 0.f;
  }
  float s[E];
#pragma unroll
  for (int j = 0; j < E; ++j) s[j] = v[j] * v[j];
  butterfly<E>(s, gsize);
  if (gsize > E) {  // the group spans tpg lanes: s[0] is this lane's partial sum
    const int tpg = gsize / E;
    const float tot = group_sum(s[0], tpg, t % tpg, lane);
#pragma unroll
    for (int j = 0; j < E; ++j) s[j] = tot;
  }
  if (!active) return;
#pragma unroll
  for (int j = 0; j < E; ++j) v[j] = v[j] / sqrtf(clamp_sq(s[j], eps2));
  store_row_chunk<T, VPT>(y + off, v);
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kThreads)
    l2norm_bwd_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                      int64_t rows, int h, int tpr_log2, int gsize, float eps2) {
  constexpr int E = 8 * VPT;
  const int lane = threadIdx.x & 31;
  const int t = lane & ((1 << tpr_log2) - 1);
  const int64_t row = (int64_t(blockIdx.x) * kThreads + threadIdx.x) >> tpr_log2;
  const bool active = row < rows && t * E < h;
  const int64_t off = row * h + int64_t(t) * E;

  float v[E], d[E];
  if (active) {
    load_row_chunk<T, VPT>(x + off, v);
    load_row_chunk<T, VPT>(dy + off, d);
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) v[j] = d[j] = 0.f;
  }
  float s[E], p[E];
#pragma unroll
  for (int j = 0; j < E; ++j) {
    s[j] = v[j] * v[j];
    p[j] = v[j] * d[j];
  }
  butterfly<E>(s, gsize);
  butterfly<E>(p, gsize);
  if (gsize > E) {
    const int tpg = gsize / E, tg = t % tpg;
    const float ts = group_sum(s[0], tpg, tg, lane);
    const float tp = group_sum(p[0], tpg, tg, lane);
#pragma unroll
    for (int j = 0; j < E; ++j) {
      s[j] = ts;
      p[j] = tp;
    }
  }
  if (!active) return;
#pragma unroll
  for (int j = 0; j < E; ++j) {
    // y = x / n; dy/dx = (dy - c y <y,dy>) / n = dy / n - c x <x,dy> / n^3, where c is the
    // share of max(sumsq, eps^2)'s gradient that reaches sumsq (jnp.maximum: 1/2 at a tie).
    const float n = sqrtf(clamp_sq(s[j], eps2));
    const float c = s[j] > eps2 ? 1.f : (s[j] == eps2 ? 0.5f : 0.f);
    d[j] = d[j] / n - v[j] * (c * p[j] / (n * n * n));
  }
  store_row_chunk<T, VPT>(dx + off, d);
}

int Vpt(int64_t h) { return h <= 256 ? 1 : (h <= 512 ? 2 : 4); }

int Log2Ceil(int64_t v) {
  int k = 0;
  while ((int64_t(1) << k) < v) ++k;
  return k;
}

struct Geometry {
  int vpt, tpr_log2, gsize;
  unsigned blocks;
};

Geometry Geom(int64_t rows, int h, int groups) {
  Geometry g;
  g.vpt = Vpt(h);
  g.tpr_log2 = Log2Ceil(h / (8 * g.vpt));
  g.gsize = h / groups;
  const int64_t rows_per_block = kThreads >> g.tpr_log2;
  g.blocks = unsigned((rows + rows_per_block - 1) / rows_per_block);
  return g;
}

// One block per kThreads >> tpr_log2 rows; gridDim.x <= 2^31 - 1.
int64_t MaxRows(int h) {
  return ((int64_t(1) << 31) - 1) * (kThreads >> Log2Ceil(h / (8 * Vpt(h))));
}

bool Aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T>
cudaError_t Fwd(const void* x, void* y, int64_t rows, int h, int groups, float eps,
                cudaStream_t stream) {
  const Geometry g = Geom(rows, h, groups);
  const float eps2 = eps * eps;
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  switch (g.vpt) {
    case 1: l2norm_fwd_kernel<T, 1><<<g.blocks, kThreads, 0, stream>>>(xp, yp, rows, h, g.tpr_log2, g.gsize, eps2); break;
    case 2: l2norm_fwd_kernel<T, 2><<<g.blocks, kThreads, 0, stream>>>(xp, yp, rows, h, g.tpr_log2, g.gsize, eps2); break;
    default: l2norm_fwd_kernel<T, 4><<<g.blocks, kThreads, 0, stream>>>(xp, yp, rows, h, g.tpr_log2, g.gsize, eps2); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t Bwd(const void* x, const void* dy, void* dx, int64_t rows, int h, int groups,
                float eps, cudaStream_t stream) {
  const Geometry g = Geom(rows, h, groups);
  const float eps2 = eps * eps;
  const T* xp = static_cast<const T*>(x);
  const T* dyp = static_cast<const T*>(dy);
  T* dxp = static_cast<T*>(dx);
  switch (g.vpt) {
    case 1: l2norm_bwd_kernel<T, 1><<<g.blocks, kThreads, 0, stream>>>(xp, dyp, dxp, rows, h, g.tpr_log2, g.gsize, eps2); break;
    case 2: l2norm_bwd_kernel<T, 2><<<g.blocks, kThreads, 0, stream>>>(xp, dyp, dxp, rows, h, g.tpr_log2, g.gsize, eps2); break;
    default: l2norm_bwd_kernel<T, 4><<<g.blocks, kThreads, 0, stream>>>(xp, dyp, dxp, rows, h, g.tpr_log2, g.gsize, eps2); break;
  }
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
