// Per-row (per-group) math of the l2norm backward, shared by the l2norm kernels and the sm_90a
// attention backward kernels that fuse it into their epilogues (Params::q_raw / k_raw).
#pragma once

namespace jca {

// max(sumsq, eps^2) with jnp.maximum's NaN propagation.
__device__ __forceinline__ float clamp_sq(float sumsq, float eps2) {
  return sumsq < eps2 ? eps2 : sumsq;
}

// dx = dy / n - c x <x,dy> / n^3 with c the share of max(sumsq, eps^2)'s gradient that reaches
// sumsq (jnp.maximum: 1/2 at a tie): per group a = 1/n, b = c <x,dy> / n^3, dx = a dy - b x.
__device__ __forceinline__ void bwd_coeffs(float sumsq, float dot, float eps2, float& a,
                                           float& b) {
  a = 1.f / sqrtf(clamp_sq(sumsq, eps2));
  const float c = sumsq > eps2 ? 1.f : (sumsq == eps2 ? 0.5f : 0.f);
  b = c * dot * (a * a * a);
}

}  // namespace jca
