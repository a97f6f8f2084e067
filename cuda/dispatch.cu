// Dtype / head-dim dispatch of the plain C++ launch API (cuda/jca.h).
#include "launch.h"
#include "launch_template.cuh"

namespace jca {

bool HeadDimSupported(int d) { return d == 16 || d == 32 || d == 64 || d == 96 || d == 128; }

size_t BwdWorkspaceBytes(int64_t B, int64_t N, int64_t T) {
  return size_t(2) * size_t(B) * size_t(N) * size_t(T) * sizeof(float);
}

size_t MinSmemBytes(int d) {
  switch (d) {
    case 16: return min_smem<16>();
    case 32: return min_smem<32>();
    case 64: return min_smem<64>();
    case 96: return min_smem<96>();
    case 128: return min_smem<128>();
    default: return 0;
  }
}

// The launchers are instantiated in cuda/inst/*.cu: never implicitly here.
#define JCA_EXTERN(D)                                                               \
  extern template cudaError_t run_fwd<D, __nv_bfloat16>(const Params&, cudaStream_t); \
  extern template cudaError_t run_fwd<D, __half>(const Params&, cudaStream_t);        \
  extern template cudaError_t run_bwd<D, __nv_bfloat16>(const Params&, cudaStream_t); \
  extern template cudaError_t run_bwd<D, __half>(const Params&, cudaStream_t);
JCA_EXTERN(16)
JCA_EXTERN(32)
JCA_EXTERN(64)
JCA_EXTERN(96)
JCA_EXTERN(128)
#undef JCA_EXTERN

#define JCA_DISPATCH(FN, p, stream)                                                  \
  do {                                                                               \
    const bool bf = (p).dtype == DType::kBF16;                                       \
    switch ((p).D) {                                                                 \
      case 16: return bf ? FN<16, __nv_bfloat16>(p, stream) : FN<16, __half>(p, stream);   \
      case 32: return bf ? FN<32, __nv_bfloat16>(p, stream) : FN<32, __half>(p, stream);   \
      case 64: return bf ? FN<64, __nv_bfloat16>(p, stream) : FN<64, __half>(p, stream);   \
      case 96: return bf ? FN<96, __nv_bfloat16>(p, stream) : FN<96, __half>(p, stream);   \
      case 128: return bf ? FN<128, __nv_bfloat16>(p, stream) : FN<128, __half>(p, stream); \
      default: return cudaErrorInvalidValue;                                         \
    }                                                                                \
  } while (0)

#ifndef JCA_HAVE_SM90
#define JCA_HAVE_SM90 0
#endif

bool Sm90KernelsBuilt() { return JCA_HAVE_SM90 != 0; }

static bool Sm90Shape(const Params& p) {
  return JCA_HAVE_SM90 && p.allow_sm90 && p.cc == 90 && (p.D == 64 || p.D == 128);
}

// The sm_90a forward reads a bias along keys with unit stride only (a bias broadcast along S
// goes to the sm_80 kernel); any dense mask.
bool UsesSm90Fwd(const Params& p) {
  return Sm90Shape(p) && (p.bias == nullptr || p.bias_ss == 1);
}

bool UsesSm90Bwd(const Params& p) {
  return Sm90Shape(p) && p.bias == nullptr && p.mask == nullptr &&
         p.dbias_mode == DBiasMode::kNone;
}

bool Sm90BwdFusesNorm(const Params& p) {
  return UsesSm90Bwd(p) && !(p.sm90_fused_dq && !p.deterministic) && p.norm_groups == 1.f;
}

#if JCA_HAVE_SM90
#define JCA_EXTERN_SM90(D)                                                                   \
  extern template cudaError_t sm90::run_fwd<D, __nv_bfloat16>(const Params&, cudaStream_t); \
  extern template cudaError_t sm90::run_fwd<D, __half>(const Params&, cudaStream_t);        \
  extern template cudaError_t sm90::run_bwd<D, __nv_bfloat16>(const Params&, cudaStream_t); \
  extern template cudaError_t sm90::run_bwd<D, __half>(const Params&, cudaStream_t);
JCA_EXTERN_SM90(64)
JCA_EXTERN_SM90(128)
#undef JCA_EXTERN_SM90
#endif

// sm_90a kernels: head dims 64 and 128 (UsesSm90Fwd / UsesSm90Bwd checked the rest).
#define JCA_DISPATCH_SM90(FN, p, stream)                                            \
  do {                                                                              \
    const bool bf = (p).dtype == DType::kBF16;                                      \
    if ((p).D == 64)                                                                \
      return bf ? sm90::FN<64, __nv_bfloat16>(p, stream) : sm90::FN<64, __half>(p, stream); \
    return bf ? sm90::FN<128, __nv_bfloat16>(p, stream) : sm90::FN<128, __half>(p, stream); \
  } while (0)

cudaError_t LaunchFwd(const Params& p, cudaStream_t stream) {
#if JCA_HAVE_SM90
  if (UsesSm90Fwd(p)) JCA_DISPATCH_SM90(run_fwd, p, stream);
#endif
  JCA_DISPATCH(run_fwd, p, stream);
}
cudaError_t LaunchBwd(const Params& p, cudaStream_t stream) {
  // The caller checks Sm90BwdFusesNorm first; the other kernels cannot fuse the l2norm.
  if (p.q_raw != nullptr && !Sm90BwdFusesNorm(p)) return cudaErrorInvalidValue;
#if JCA_HAVE_SM90
  if (UsesSm90Bwd(p)) JCA_DISPATCH_SM90(run_bwd, p, stream);
#endif
  JCA_DISPATCH(run_bwd, p, stream);
}

}  // namespace jca
