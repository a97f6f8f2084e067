// Plain C++ launch API of the fused l2 normalisation (no XLA, no Python here).
//
// x is [rows, h] row-major (contiguous rows), bf16 or f16. Each row is split into `groups` equal
// groups of h / groups elements; per group g, computed in f32:
//   forward   y  = x / n,                         n = sqrt(max(sumsq_g, eps^2))
//   backward  dx = (dy - c * y * <y, dy>_g) / n   c = 1 if sumsq_g > eps^2, 1/2 if equal, else 0
// (where sumsq <= eps^2 the norm is the constant eps and dx = dy / eps): the same function and
// the same derivative as jax autodiff of `jax_cosine_attention.normalize.l2norm`, whose
// jnp.maximum splits the gradient evenly at a tie. Outputs are in x's dtype.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "jca.h"  // DType

namespace jca {

// Whether the kernels serve rows of h elements in `groups` groups: h % 8 == 0 and h <= 256, or
// h <= 512 with h % 16 == 0, or h <= 1024 with h % 32 == 0; groups divides h, and the group size
// is a multiple or a divisor of the 8/16/32 elements one thread holds. (Mirrored in Python by
// jax_cosine_attention/_l2norm_op.py: kernel_supports.)
bool L2NormSupported(int64_t h, int64_t groups);

// Enqueue only on `stream`; no allocation, no synchronisation (CUDA-graph safe). Pointers must
// be 16-byte aligned. rows == 0 enqueues nothing. One pass: a team of up to 32 lanes per row,
// 16-byte loads, 2 rows per team by default (JCA_L2NORM_ROWS=1|2|4, read once, overrides it).
cudaError_t LaunchL2NormFwd(DType dtype, const void* x, void* y, int64_t rows, int h, int groups,
                            float eps, cudaStream_t stream);
cudaError_t LaunchL2NormBwd(DType dtype, const void* x, const void* dy, void* dx, int64_t rows,
                            int h, int groups, float eps, cudaStream_t stream);

}  // namespace jca
