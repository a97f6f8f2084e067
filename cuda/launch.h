// Declarations of the per-(head dim, dtype) launchers defined in cuda/inst/*.cu.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "jca.h"

namespace jca {
template <int D, typename T>
cudaError_t run_fwd(const Params& p, cudaStream_t stream);
template <int D, typename T>
cudaError_t run_bwd(const Params& p, cudaStream_t stream);
namespace sm90 {  // cuda/sm90/inst/*.cu, built only with JCA_HAVE_SM90
template <int D, typename T>
cudaError_t run_fwd(const Params& p, cudaStream_t stream);
template <int D, typename T>
cudaError_t run_bwd(const Params& p, cudaStream_t stream);
}  // namespace sm90
}  // namespace jca
