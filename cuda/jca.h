// Plain C++ launch API of the fused cosine-sim attention kernels (no XLA, no Python here).
//
// Layouts (row-major, as XLA hands them over):
//   q [B,T,N,H], k/v [B,S,K,H], o/do [B,T,N,H], lse/delta [B,N,T] f32, scale [N] f32,
//   bias (f32) and mask (uint8/bool) of logical shape [B,N,T,S] given by per-dim element strides
//   (stride 0 = broadcast dim), q_len/kv_len int32 [B] or null.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace jca {

enum class DType : int { kF16 = 0, kBF16 = 1 };

// How the backward writes dbias (decided on the host from the bias shape and `deterministic`).
enum class DBiasMode : int {
  kNone = 0,     // no dbias requested
  kStore = 1,    // full-shape bias: each element written by exactly one thread
  kAtomic = 2,   // broadcast bias: f32 atomic reduce into zeroed dbias
  kOrdered = 3,  // broadcast over B and/or N only, deterministic: one CTA loops over the reduced
                 // (b, n) in a fixed order and does plain read-modify-write
};

struct Params {
  // ---- sizes
  int B = 0, T = 0, S = 0, N = 0, KH = 0, D = 0;
  int hpk = 1;              // query heads per kv head (N / KH)
  DType dtype = DType::kBF16;

  // ---- inputs
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* scale = nullptr;  // [N]
  const float* bias = nullptr;   // f32, strides below (elements), null if absent
  int64_t bias_sb = 0, bias_sn = 0, bias_st = 0, bias_ss = 0;
  int bias_dims[4] = {1, 1, 1, 1};  // [Bb, Nb, Tb, Sb]
  const uint8_t* mask = nullptr;    // bool, True = attend, null if absent
  int64_t mask_sb = 0, mask_sn = 0, mask_st = 0, mask_ss = 0;
  const int32_t* q_len = nullptr;   // [B] or null
  const int32_t* kv_len = nullptr;  // [B] or null
  bool causal = false;
  bool bounded = false;     // q, k are l2-normalised: |<q,k>| <= norm_groups
  float norm_groups = 1.f;  // the l2norm `groups`
  bool deterministic = false;
  int cc = 0;               // device compute capability, major * 10 + minor
  int smem_optin = 0;       // shared memory a block may opt into (bytes); tiles are chosen to fit
  int sm_count = 0;         // multiprocessors (persistent grids)
  bool allow_sm90 = true;   // let the kernels take the sm_90a path where it applies
  bool sm90_fused_dq = false;  // sm_90a backward: dQ inside the dK/dV kernel (not deterministic)

  // ---- forward outputs
  void* o = nullptr;        // [B,T,N,H], q dtype
  float* lse = nullptr;     // [B,N,T], natural log, -inf for rows with no valid key

  // ---- backward inputs / outputs
  const void* dout = nullptr;       // [B,T,N,H]
  const void* out = nullptr;        // [B,T,N,H]
  const float* lse_in = nullptr;    // [B,N,T]
  float* dq_acc = nullptr;          // [B,T,N,H] f32, UNSCALED (sum_s dS k)
  void* dk = nullptr;               // [B,S,K,H], q dtype
  void* dv = nullptr;               // [B,S,K,H], q dtype
  float* dbias = nullptr;           // bias shape, f32 (null when not requested)
  DBiasMode dbias_mode = DBiasMode::kNone;
  bool fuse_dq = false;             // dQ by f32 reductions from the dK/dV kernel (set by LaunchBwd)
  int64_t dbias_elems = 0;
  void* workspace = nullptr;        // BwdWorkspaceBytes(...) bytes
  size_t workspace_bytes = 0;

  // ---- l2norm backward fused into the backward's epilogues (sm_90a two-kernel backward only;
  // q and k above are then l2norm(q_raw), l2norm(k_raw) with groups = 1). Instead of dq_acc the
  // dQ kernel writes dq_norm = d/d q_raw (q dtype) and rowdot [B,N,T] f32 = sum_h q dq_acc (for
  // dscale); the dK/dV kernel writes d/d k_raw into dk. The l2norm backward per row, as
  // jca_l2norm_bwd: dx = dy / n - c <x,dy> x / n^3, n = sqrt(max(|x|^2, eps^2)), c = 1 (|x| >
  // eps), 1/2 (tie), 0 (below).
  const void* q_raw = nullptr;      // [B,T,N,H], q dtype; null: plain backward
  const void* k_raw = nullptr;      // [B,S,K,H]
  void* dq_norm = nullptr;          // [B,T,N,H], q dtype
  float* rowdot = nullptr;          // [B,N,T] f32
  float norm_eps = 0.f;
};

// Head dims with compiled kernels.
bool HeadDimSupported(int d);
// Whether the sm_90a (TMA + wgmma) forward kernels were compiled into this build.
bool Sm90KernelsBuilt();
// Whether LaunchFwd takes the sm_90a kernel for these parameters (else the sm_80 kernel): an
// sm_90 device, head dim 64 or 128; a bias only with unit stride along keys.
bool UsesSm90Fwd(const Params& p);
// Whether LaunchBwd takes the sm_90a kernels (deterministic: dQ and dK/dV kernels without
// atomics): an sm_90 device, head dim 64 or 128, no bias, no dense mask.
bool UsesSm90Bwd(const Params& p);
// Whether LaunchBwd can fuse the l2norm backward (Params::q_raw): UsesSm90Bwd with the two-kernel
// backward (not sm90_fused_dq).
bool Sm90BwdFusesNorm(const Params& p);
// Bytes of XLA-owned scratch the backward needs (delta and log2-lse, f32 [B,N,T] each).
size_t BwdWorkspaceBytes(int64_t B, int64_t N, int64_t T);
// Shared memory (bytes) a device must allow a block for head dim d: the launchers step down to
// smaller tiles where the default ones do not fit Params::smem_optin (99 KB on sm_86/89/120).
size_t MinSmemBytes(int d);

// Enqueue only on `stream`; no allocation, no synchronisation (CUDA-graph safe).
cudaError_t LaunchFwd(const Params& p, cudaStream_t stream);
cudaError_t LaunchBwd(const Params& p, cudaStream_t stream);

}  // namespace jca
