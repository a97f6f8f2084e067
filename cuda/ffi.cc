// XLA FFI handlers for the fused cosine-sim attention kernels and the nanobind module that hands
// their capsules to Python. Compiled by the host compiler (nvcc never sees the XLA headers).
//
// Targets (see jax_cosine_attention/_cuda.py for the Python side):
//   jca_cosattn_fwd(q, k, v, scale, bias, mask, q_len, kv_len) -> (o, lse)
//       attrs: causal: bool, groups: i64, bounded: bool
//   jca_cosattn_bwd(do, q, k, v, o, lse, scale, bias, mask, q_len, kv_len, q_raw, k_raw)
//       -> (dq_acc f32, dk, dv, dbias f32, rowdot f32, workspace u8)
//       attrs: causal: bool, groups: i64, bounded: bool, need_dbias: bool, deterministic: bool,
//              sm90: bool, sm90_fused_dq: bool, norm_eps: f32
//       norm_eps >= 0: q, k are l2norm(q_raw), l2norm(k_raw) and the l2norm backward is fused
//       (sm_90a two-kernel backward only): the first result is dq = d/d q_raw in q's dtype, dk
//       is d/d k_raw, rowdot [B,N,T] = sum_h q dq_acc; else q_raw, k_raw, rowdot are (0,).
//   jca_l2norm_fwd(x) -> y            x [..., H] bf16/f16, y = l2norm(x) in x's dtype
//   jca_l2norm_bwd(x, dy) -> dx       dx in x's dtype
//       attrs: groups: i64, eps: f32   (see l2norm.h; jax_cosine_attention/_l2norm_op.py)
// Absent optional operands (bias, mask, q_len, kv_len) and an unrequested dbias are zero-size
// arrays of shape (0,).
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>

#include "jca.h"
#include "l2norm.h"
#include "nanobind/nanobind.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace {

// ------------------------------------------------------------------ device properties (cached)
struct DeviceInfo {
  bool ok = false;
  int cc_major = 0, cc_minor = 0;
  int smem_optin = 0;
  int sm_count = 0;
};

ffi::ErrorOr<DeviceInfo> GetDeviceInfo(int32_t ordinal) {
  static std::mutex mu;
  static std::array<DeviceInfo, 64> cache{};
  if (ordinal < 0 || ordinal >= int32_t(cache.size()))
    return ffi::Unexpected(ffi::Error::InvalidArgument("jca: device ordinal out of range"));
  std::lock_guard<std::mutex> lock(mu);
  DeviceInfo& d = cache[ordinal];
  if (!d.ok) {
    cudaError_t e1 = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, ordinal);
    cudaError_t e2 = cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, ordinal);
    cudaError_t e3 =
        cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, ordinal);
    cudaError_t e4 = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, ordinal);
    for (cudaError_t e : {e1, e2, e3, e4})
      if (e != cudaSuccess)
        return ffi::Unexpected(ffi::Error::Internal(std::string("jca: cudaDeviceGetAttribute: ") +
                                                    cudaGetErrorString(e)));
    // Test aid: JCA_DEBUG_SMEM_LIMIT=<bytes> caps what the launchers may use, so that a large
    // device runs the tiles of a small one (99 KB a block on sm_86/89/120).
    if (const char* cap = std::getenv("JCA_DEBUG_SMEM_LIMIT"); cap != nullptr && std::atoi(cap) > 0)
      d.smem_optin = std::min(d.smem_optin, std::atoi(cap));
    d.ok = true;
  }
  return d;
}

// Test aid: JCA_DEBUG_POISON=1 (read once) fills every kernel output with 0xFF bytes (NaN) before
// the kernels run, so an element they never write is caught by the GPU tests.
bool PoisonOutputs() {
  static const bool on = [] {
    const char* e = std::getenv("JCA_DEBUG_POISON");
    return e != nullptr && e[0] == '1';
  }();
  return on;
}

cudaError_t Poison(void* ptr, size_t bytes, cudaStream_t stream) {
  return bytes ? cudaMemsetAsync(ptr, 0xFF, bytes, stream) : cudaSuccess;
}

ffi::Error Invalid(const std::string& msg) { return ffi::Error::InvalidArgument("jca: " + msg); }

std::string DimsStr(const ffi::AnyBuffer& b) {
  std::string s = "[";
  auto d = b.dimensions();
  for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + std::to_string(d[i]);
  return s + "]";
}

// Fills sizes, dtype, q/k/v, scale and the optional operands of p. Shared by fwd and bwd.
ffi::Error FillCommon(jca::Params& p, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                      const ffi::AnyBuffer& v, const ffi::AnyBuffer& scale,
                      const ffi::AnyBuffer& bias, const ffi::AnyBuffer& mask,
                      const ffi::AnyBuffer& q_len, const ffi::AnyBuffer& kv_len, bool causal,
                      int64_t groups, bool bounded, int32_t ordinal) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return Invalid("q, k, v must be rank 4 ([B,T,N,H], [B,S,K,H], [B,S,K,H]); got q" + DimsStr(q) +
                   " k" + DimsStr(k) + " v" + DimsStr(v));
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return Invalid("q, k, v must share one dtype");
  if (q.element_type() == ffi::BF16) p.dtype = jca::DType::kBF16;
  else if (q.element_type() == ffi::F16) p.dtype = jca::DType::kF16;
  else return Invalid("dtype must be bf16 or f16 (f32 goes to the XLA path)");
  p.B = int(qd[0]); p.T = int(qd[1]); p.N = int(qd[2]); p.D = int(qd[3]);
  p.S = int(kd[1]); p.KH = int(kd[2]);
  if (kd[0] != qd[0] || vd[0] != qd[0] || vd[1] != kd[1] || vd[2] != kd[2] || kd[3] != qd[3] ||
      vd[3] != qd[3])
    return Invalid("inconsistent shapes q" + DimsStr(q) + " k" + DimsStr(k) + " v" + DimsStr(v) +
                   " (the kernel needs Hv == H)");
  if (p.KH <= 0 || p.N % p.KH != 0) return Invalid("N must be a multiple of K");
  p.hpk = p.N / p.KH;
  if (!jca::HeadDimSupported(p.D))
    return Invalid("head dim " + std::to_string(p.D) + " not compiled (16, 32, 64, 96, 128)");
  if (scale.element_type() != ffi::F32 || scale.element_count() != size_t(p.N))
    return Invalid("scale must be f32 [N]");
  p.q = q.untyped_data(); p.k = k.untyped_data(); p.v = v.untyped_data();
  p.scale = static_cast<const float*>(scale.untyped_data());
  p.causal = causal;
  p.bounded = bounded;
  p.norm_groups = float(groups < 1 ? 1 : groups);

  const int64_t full[4] = {p.B, p.N, p.T, p.S};
  if (bias.element_count() > 0) {
    auto bd = bias.dimensions();
    if (bd.size() != 4 || bias.element_type() != ffi::F32)
      return Invalid("bias must be f32 rank 4 [Bb,Nb,Tb,Sb]; got " + DimsStr(bias));
    for (int i = 0; i < 4; ++i)
      if (bd[i] != 1 && bd[i] != full[i])
        return Invalid("bias dim " + std::to_string(i) + " must be 1 or full; got " + DimsStr(bias));
    for (int i = 0; i < 4; ++i) p.bias_dims[i] = int(bd[i]);
    p.bias = static_cast<const float*>(bias.untyped_data());
    p.bias_ss = bd[3] == 1 ? 0 : 1;
    p.bias_st = bd[2] == 1 ? 0 : bd[3];
    p.bias_sn = bd[1] == 1 ? 0 : bd[2] * bd[3];
    p.bias_sb = bd[0] == 1 ? 0 : bd[1] * bd[2] * bd[3];
  }
  if (mask.element_count() > 0) {
    auto md = mask.dimensions();
    if (md.size() != 4 || mask.element_type() != ffi::PRED)
      return Invalid("mask must be bool rank 4 [Bm,Nm,Tm,Sm]; got " + DimsStr(mask));
    for (int i = 0; i < 4; ++i)
      if (md[i] != 1 && md[i] != full[i])
        return Invalid("mask dim " + std::to_string(i) + " must be 1 or full; got " + DimsStr(mask));
    p.mask = static_cast<const uint8_t*>(mask.untyped_data());
    p.mask_ss = md[3] == 1 ? 0 : 1;
    p.mask_st = md[2] == 1 ? 0 : md[3];
    p.mask_sn = md[1] == 1 ? 0 : md[2] * md[3];
    p.mask_sb = md[0] == 1 ? 0 : md[1] * md[2] * md[3];
  }
  for (const ffi::AnyBuffer* lb : {&q_len, &kv_len}) {
    if (lb->element_count() == 0) continue;
    if (lb->element_type() != ffi::S32 || lb->element_count() != size_t(p.B))
      return Invalid("q_len / kv_len must be int32 [B]");
  }
  if (q_len.element_count() > 0) p.q_len = static_cast<const int32_t*>(q_len.untyped_data());
  if (kv_len.element_count() > 0) p.kv_len = static_cast<const int32_t*>(kv_len.untyped_data());

  auto info = GetDeviceInfo(ordinal);
  if (info.has_error()) return info.error();
  if (info->cc_major < 8) return Invalid("needs compute capability >= 8.0 (mma.sync bf16/f16)");
  p.cc = info->cc_major * 10 + info->cc_minor;
  p.smem_optin = info->smem_optin;
  p.sm_count = info->sm_count;
  if (jca::MinSmemBytes(p.D) > size_t(info->smem_optin))
    return Invalid("kernel needs " + std::to_string(jca::MinSmemBytes(p.D)) +
                   " bytes of shared memory per block; device allows " +
                   std::to_string(info->smem_optin));
  return ffi::Error::Success();
}

ffi::Error CudaErr(const char* what, cudaError_t e) {
  return ffi::Error::Internal(std::string("jca: ") + what + ": " + cudaGetErrorString(e));
}

bool SameDims(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b) {
  auto x = a.dimensions(), y = b.dimensions();
  if (x.size() != y.size()) return false;
  for (size_t i = 0; i < x.size(); ++i)
    if (x[i] != y[i]) return false;
  return true;
}

ffi::Error FwdImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k,
                   ffi::AnyBuffer v, ffi::AnyBuffer scale, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                   ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len, ffi::Result<ffi::AnyBuffer> o,
                   ffi::Result<ffi::AnyBuffer> lse, bool causal, int64_t groups, bool bounded,
                   bool sm90) {
  jca::Params p;
  p.allow_sm90 = sm90;
  if (ffi::Error e = FillCommon(p, q, k, v, scale, bias, mask, q_len, kv_len, causal, groups,
                                bounded, ordinal);
      e.failure())
    return e;
  if (!SameDims(*o, q) || o->element_type() != q.element_type())
    return Invalid("o must match q's shape and dtype");
  if (lse->element_type() != ffi::F32 ||
      lse->element_count() != size_t(p.B) * size_t(p.N) * size_t(p.T))
    return Invalid("lse must be f32 [B,N,T]");
  p.o = o->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  if (p.B == 0 || p.T == 0 || p.N == 0) return ffi::Error::Success();
  if (PoisonOutputs()) {
    for (auto* r : {&o, &lse})
      if (cudaError_t e = Poison((*r)->untyped_data(), (*r)->size_bytes(), stream); e != cudaSuccess)
        return CudaErr("poison", e);
  }
  if (cudaError_t e = jca::LaunchFwd(p, stream); e != cudaSuccess) return CudaErr("fwd launch", e);
  return ffi::Error::Success();
}

ffi::Error BwdImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer dout, ffi::AnyBuffer q,
                   ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                   ffi::AnyBuffer scale, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                   ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len, ffi::AnyBuffer q_raw,
                   ffi::AnyBuffer k_raw, ffi::Result<ffi::AnyBuffer> dq_acc,
                   ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                   ffi::Result<ffi::AnyBuffer> dbias, ffi::Result<ffi::AnyBuffer> rowdot,
                   ffi::Result<ffi::AnyBuffer> workspace, bool causal, int64_t groups,
                   bool bounded, bool need_dbias, bool deterministic, bool sm90,
                   bool sm90_fused_dq, float norm_eps) {
  jca::Params p;
  p.allow_sm90 = sm90;
  p.sm90_fused_dq = sm90_fused_dq;
  if (ffi::Error e = FillCommon(p, q, k, v, scale, bias, mask, q_len, kv_len, causal, groups,
                                bounded, ordinal);
      e.failure())
    return e;
  if (!SameDims(dout, q) || dout.element_type() != q.element_type() || !SameDims(out, q) ||
      out.element_type() != q.element_type())
    return Invalid("do and o must match q's shape and dtype");
  if (lse.element_type() != ffi::F32 ||
      lse.element_count() != size_t(p.B) * size_t(p.N) * size_t(p.T))
    return Invalid("lse must be f32 [B,N,T]");
  p.deterministic = deterministic;
  const bool fuse_norm = norm_eps >= 0.f;  // l2norm backward fused (jca.h: Params::q_raw)
  if (fuse_norm) {
    if (!jca::Sm90BwdFusesNorm(p))
      return Invalid("the fused l2norm backward needs the sm_90a two-kernel backward (an sm_90 "
                     "device, head dim 64 or 128, groups 1, no bias or mask, not "
                     "sm90_fused_dq)");
    if (!SameDims(q_raw, q) || q_raw.element_type() != q.element_type() || !SameDims(k_raw, k) ||
        k_raw.element_type() != k.element_type())
      return Invalid("q_raw / k_raw must match q / k");
    if (!SameDims(*dq_acc, q) || dq_acc->element_type() != q.element_type())
      return Invalid("with norm_eps >= 0 the first result is dq, with q's shape and dtype");
    if (rowdot->element_type() != ffi::F32 ||
        rowdot->element_count() != size_t(p.B) * size_t(p.N) * size_t(p.T))
      return Invalid("rowdot must be f32 [B,N,T]");
    p.q_raw = q_raw.untyped_data();
    p.k_raw = k_raw.untyped_data();
    p.dq_norm = dq_acc->untyped_data();
    p.rowdot = static_cast<float*>(rowdot->untyped_data());
    p.norm_eps = norm_eps;
  } else if (!SameDims(*dq_acc, q) || dq_acc->element_type() != ffi::F32) {
    return Invalid("dq_acc must be f32 with q's shape");
  }
  if (!SameDims(*dk, k) || dk->element_type() != k.element_type() || !SameDims(*dv, v) ||
      dv->element_type() != v.element_type())
    return Invalid("dk / dv must match k / v");
  if (need_dbias) {
    if (p.bias == nullptr) return Invalid("need_dbias without a bias");
    if (!SameDims(*dbias, bias) || dbias->element_type() != ffi::F32)
      return Invalid("dbias must be f32 with the bias's shape");
    p.dbias = static_cast<float*>(dbias->untyped_data());
    p.dbias_elems = int64_t(dbias->element_count());
    const int* bd = p.bias_dims;
    const bool rb = bd[0] == 1 && p.B > 1, rn = bd[1] == 1 && p.N > 1;
    const bool rt = bd[2] == 1 && p.T > 1, rs = bd[3] == 1 && p.S > 1;
    if (!rb && !rn && !rt && !rs) p.dbias_mode = jca::DBiasMode::kStore;
    else if (rt || rs || !deterministic) p.dbias_mode = jca::DBiasMode::kAtomic;
    else p.dbias_mode = jca::DBiasMode::kOrdered;
  }
  const size_t ws = jca::BwdWorkspaceBytes(p.B, p.N, p.T);
  if (workspace->size_bytes() < ws)
    return Invalid("workspace too small: " + std::to_string(workspace->size_bytes()) + " < " +
                   std::to_string(ws));
  p.dout = dout.untyped_data();
  p.out = out.untyped_data();
  p.lse_in = static_cast<const float*>(lse.untyped_data());
  if (!fuse_norm) p.dq_acc = static_cast<float*>(dq_acc->untyped_data());
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  p.workspace = workspace->untyped_data();
  p.workspace_bytes = workspace->size_bytes();
  if (p.B == 0 || p.N == 0) return ffi::Error::Success();
  if (p.T == 0 || p.S == 0) {  // nothing attends: all gradients are zero
    for (ffi::Result<ffi::AnyBuffer>* r : {&dq_acc, &dk, &dv, &dbias, &rowdot})
      if ((*r)->size_bytes() > 0)
        if (cudaError_t e = cudaMemsetAsync((*r)->untyped_data(), 0, (*r)->size_bytes(), stream);
            e != cudaSuccess)
          return CudaErr("memset", e);
    return ffi::Error::Success();
  }
  if (PoisonOutputs()) {
    for (auto* r : {&dq_acc, &dk, &dv, &rowdot, &workspace})
      if (cudaError_t e = Poison((*r)->untyped_data(), (*r)->size_bytes(), stream); e != cudaSuccess)
        return CudaErr("poison", e);
  }
  if (cudaError_t e = jca::LaunchBwd(p, stream); e != cudaSuccess) return CudaErr("bwd launch", e);
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ fused l2norm

// Rows and head dim of an l2norm operand x [..., H], checked against the kernel's coverage.
ffi::Error L2NormShape(const ffi::AnyBuffer& x, int64_t groups, int64_t& rows, int& h,
                       jca::DType& dtype) {
  auto d = x.dimensions();
  if (d.size() < 1) return Invalid("l2norm: x must have rank >= 1");
  if (x.element_type() == ffi::BF16) dtype = jca::DType::kBF16;
  else if (x.element_type() == ffi::F16) dtype = jca::DType::kF16;
  else return Invalid("l2norm: dtype must be bf16 or f16 (others use the XLA path)");
  const int64_t last = d[d.size() - 1];
  if (!jca::L2NormSupported(last, groups))
    return Invalid("l2norm: head dim " + std::to_string(last) + " with groups=" +
                   std::to_string(groups) + " not served by the kernel; got x" + DimsStr(x));
  h = int(last);
  rows = 1;
  for (size_t i = 0; i + 1 < d.size(); ++i) rows *= d[i];
  return ffi::Error::Success();
}

ffi::Error L2NormFwdImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                         int64_t groups, float eps) {
  int64_t rows = 0;
  int h = 0;
  jca::DType dtype;
  if (ffi::Error e = L2NormShape(x, groups, rows, h, dtype); e.failure()) return e;
  if (!SameDims(*y, x) || y->element_type() != x.element_type())
    return Invalid("l2norm: y must match x's shape and dtype");
  if (rows == 0) return ffi::Error::Success();
  if (PoisonOutputs())
    if (cudaError_t e = Poison(y->untyped_data(), y->size_bytes(), stream); e != cudaSuccess)
      return CudaErr("poison", e);
  if (cudaError_t e = jca::LaunchL2NormFwd(dtype, x.untyped_data(), y->untyped_data(), rows, h,
                                           int(groups), eps, stream);
      e != cudaSuccess)
    return CudaErr("l2norm fwd launch", e);
  return ffi::Error::Success();
}

ffi::Error L2NormBwdImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                         ffi::Result<ffi::AnyBuffer> dx, int64_t groups, float eps) {
  int64_t rows = 0;
  int h = 0;
  jca::DType dtype;
  if (ffi::Error e = L2NormShape(x, groups, rows, h, dtype); e.failure()) return e;
  if (!SameDims(dy, x) || dy.element_type() != x.element_type() || !SameDims(*dx, x) ||
      dx->element_type() != x.element_type())
    return Invalid("l2norm: dy and dx must match x's shape and dtype");
  if (rows == 0) return ffi::Error::Success();
  if (PoisonOutputs())
    if (cudaError_t e = Poison(dx->untyped_data(), dx->size_bytes(), stream); e != cudaSuccess)
      return CudaErr("poison", e);
  if (cudaError_t e = jca::LaunchL2NormBwd(dtype, x.untyped_data(), dy.untyped_data(),
                                           dx->untyped_data(), rows, h, int(groups), eps, stream);
      e != cudaSuccess)
    return CudaErr("l2norm bwd launch", e);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JcaCosAttnFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // scale
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Arg<ffi::AnyBuffer>()  // q_len
                                  .Arg<ffi::AnyBuffer>()  // kv_len
                                  .Ret<ffi::AnyBuffer>()  // o
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("bounded")
                                  .Attr<bool>("sm90"),  // may take the sm_90a kernel
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JcaCosAttnBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // do
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // o
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // scale
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Arg<ffi::AnyBuffer>()  // q_len
                                  .Arg<ffi::AnyBuffer>()  // kv_len
                                  .Arg<ffi::AnyBuffer>()  // q_raw (fused l2norm bwd, else (0,))
                                  .Arg<ffi::AnyBuffer>()  // k_raw
                                  .Ret<ffi::AnyBuffer>()  // dq_acc (fused l2norm bwd: dq)
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // dbias
                                  .Ret<ffi::AnyBuffer>()  // rowdot (fused l2norm bwd, else (0,))
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("bounded")
                                  .Attr<bool>("need_dbias")
                                  .Attr<bool>("deterministic")
                                  .Attr<bool>("sm90")  // may take the sm_90a kernel
                                  .Attr<bool>("sm90_fused_dq")  // ... with the fused dQ
                                  .Attr<float>("norm_eps"),  // >= 0: fuse the l2norm bwd
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JcaL2NormFwd, L2NormFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JcaL2NormBwd, L2NormBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps"),
                              {ffi::Traits::kCmdBufferCompatible});

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>);
  return nb::capsule(reinterpret_cast<void*>(fn));
}

NB_MODULE(_jca_cuda, m) {
  m.def("registrations", [] {
    nb::dict d;
    d["jca_cosattn_fwd"] = Capsule(JcaCosAttnFwd);
    d["jca_cosattn_bwd"] = Capsule(JcaCosAttnBwd);
    d["jca_l2norm_fwd"] = Capsule(JcaL2NormFwd);
    d["jca_l2norm_bwd"] = Capsule(JcaL2NormBwd);
    return d;
  });
  m.def("bwd_workspace_bytes",
        [](int64_t B, int64_t N, int64_t T) { return jca::BwdWorkspaceBytes(B, N, T); });
  m.def("head_dim_supported", [](int d) { return jca::HeadDimSupported(d); });
  m.def("l2norm_supported",
        [](int64_t h, int64_t groups) { return jca::L2NormSupported(h, groups); });
  // Compute capabilities (major * 10 + minor) of the visible CUDA devices; [] if none.
  m.def("compute_capabilities", [] {
    nb::list out;
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();  // clear it: no device is not an error here
      return out;
    }
    for (int d = 0; d < count; ++d) {
      auto info = GetDeviceInfo(d);
      if (!info.has_error()) out.append(info->cc_major * 10 + info->cc_minor);
    }
    return out;
  });
  m.attr("sm90_built") = jca::Sm90KernelsBuilt();
  m.attr("ffi_api_version") = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
}
