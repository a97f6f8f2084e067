"""Python side of the fused CUDA kernels: import the extension, register its XLA FFI targets and
wrap them with `jax.ffi.ffi_call`.

Core contract (per-device arrays, static shapes; see `_ops.py`):
  fwd(q[B,T,N,H], k[B,S,K,H], v[B,S,K,H], scale[N] f32, bias?, mask?, q_len?, kv_len?)
      -> o [B,T,N,H] (q dtype), lse [B,N,T] f32 (natural log, -inf for rows with no valid key)
  bwd(do, q, k, v, o, lse, scale, bias?, mask?, q_len?, kv_len?)
      -> dq_acc f32 [B,T,N,H] (unscaled), dk, dv (q dtype), dbias f32 in the bias's shape or None
      (or, with the l2norm backward fused: see `bwd`'s norm_eps)

Absent optional operands, and dbias when it is not needed, cross the FFI boundary as zero-size
(0,) arrays. The bias is passed as f32 (converted here when it is bf16/f16); the mask as bool.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

FWD_TARGET = "jca_cosattn_fwd"
BWD_TARGET = "jca_cosattn_bwd"
HEAD_DIMS = (16, 32, 64, 96, 128)
DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))

_C = None
if importlib.util.find_spec(f"{__package__}._jca_cuda") is None:  # built only with nvcc + jax
    IMPORT_ERROR = ("the CUDA extension was not built (pure-JAX install: no nvcc, JCA_CUDA=OFF, "
                    "or jax missing at build time)")
else:
    try:
        from . import _jca_cuda as _C
    except ImportError as e:  # pragma: no cover - depends on the build
        IMPORT_ERROR = f"the CUDA extension failed to import: {e}"
if _C is not None:
    IMPORT_ERROR = None
    try:
        for _name, _capsule in _C.registrations().items():
            jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
    except Exception as e:  # pragma: no cover
        _C = None
        IMPORT_ERROR = f"registering the CUDA FFI targets failed: {e!r}"

DISABLED = os.environ.get("JCA_DISABLE_CUDA", "0") == "1"
AVAILABLE = _C is not None and not DISABLED
if _C is not None and DISABLED:
    IMPORT_ERROR = "CUDA kernels disabled by JCA_DISABLE_CUDA=1"
# Whether the sm_90a (TMA + wgmma) kernels are in this build. They run on sm_90 devices for head
# dims 64 and 128: the forward also with masks and biases (unit stride along keys), the
# backward (deterministic) without bias or dense mask;
# JCA_SM90=0 (read when a call is traced) keeps every call on the portable sm_80 kernels.
SM90_BUILT = bool(getattr(_C, "sm90_built", False))


def sm90_enabled():
    return os.environ.get("JCA_SM90", "1") != "0"


def sm90_fused_dq_enabled():
    """JCA_SM90_FUSED_DQ=1 (read at trace): the sm_90a backward computes dQ inside the dK/dV
    kernel (FA3's five products, TMA reduce-add into dq_acc; not deterministic). Off by default:
    slower than the two-kernel backward on an H100 (benchmarks/NOTES.md)."""
    return os.environ.get("JCA_SM90_FUSED_DQ", "0") == "1"


def bwd_workspace_bytes(B, N, T):
    """Scratch of the backward (delta and log2-lse, f32 [B,N,T] each); mirrors BwdWorkspaceBytes."""
    return 2 * 4 * int(B) * int(N) * int(T)


def unsupported_reason(q_shape, k_shape, v_shape, dtype, bias_shape=None, bias_dtype=None,
                       mask_shape=None):
    """None if the fused kernel serves this static configuration, else a short reason."""
    if not AVAILABLE:
        return IMPORT_ERROR or "CUDA kernels disabled (JCA_DISABLE_CUDA=1)"
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        return "the kernel takes rank-4 q/k/v"
    dt = np.dtype(dtype)
    if dt not in DTYPES:
        return f"dtype {dt} not compiled (bf16, f16; f32 uses the XLA path)"
    B, T, N, H = q_shape
    Bk, S, K, Hk = k_shape
    if Hk != H or tuple(v_shape[:3]) != (Bk, S, K) or Bk != B:
        return "inconsistent q/k/v shapes"
    if v_shape[3] != H:
        return f"value head dim {v_shape[3]} != query head dim {H} not compiled"
    if H not in HEAD_DIMS:
        return f"head dim {H} not compiled ({', '.join(map(str, HEAD_DIMS))})"
    if K == 0 or N % K:
        return "N must be a multiple of K"
    if max(B, N, K) > 65535:
        return "B, N or K above 65535 (grid limit)"
    if T >= 2**31 // 2 or S >= 2**31 // 2:
        return "sequence too long"
    full = (B, N, T, S)
    for name, shp in (("bias", bias_shape), ("mask", mask_shape)):
        if shp is None:
            continue
        if len(shp) != 4 or any(d not in (1, f) for d, f in zip(shp, full)):
            return f"{name} shape {tuple(shp)} is not [B|1, N|1, T|1, S|1]"
    if bias_shape is not None and bias_dtype is not None:
        if np.dtype(bias_dtype) not in (np.dtype(np.float32), np.dtype(jnp.bfloat16),
                                        np.dtype(np.float16)):
            return f"bias dtype {np.dtype(bias_dtype)} not supported"
    return None


# ------------------------------------------------------------------ ffi_call plumbing

def _result(x, shape, dtype, dims=None):
    """Result type derived from input `x`'s aval (keeps vma under shard_map and Explicit shardings).

    dims[i] names the dim of x whose sharding output dim i inherits (None: replicated)."""
    a = jax.typeof(x)
    kw = {"shape": tuple(shape), "dtype": dtype}
    sh = getattr(a, "sharding", None)
    spec = getattr(sh, "spec", None)
    if spec is not None and hasattr(sh, "update"):
        src = tuple(spec) + (None,) * (a.ndim - len(spec))
        dims = dims if dims is not None else (None,) * len(shape)
        new = tuple(src[d] if d is not None else None for d in dims)
        if new != tuple(spec) or len(shape) != a.ndim:
            kw["sharding"] = sh.update(spec=jax.sharding.PartitionSpec(*new))
    return a.update(**kw)


def _empty(x, dtype):
    """A zero-size (0,) operand standing for an absent optional input, derived from `x`."""
    return jax.lax.slice_in_dim(x.reshape(-1), 0, 0).astype(dtype)


def _opts(q, bias, mask, q_len, kv_len):
    bias = _empty(q, jnp.float32) if bias is None else bias.astype(jnp.float32)
    mask = _empty(q, jnp.bool_) if mask is None else mask.astype(jnp.bool_)
    q_len = _empty(q, jnp.int32) if q_len is None else q_len.astype(jnp.int32)
    kv_len = _empty(q, jnp.int32) if kv_len is None else kv_len.astype(jnp.int32)
    return bias, mask, q_len, kv_len


def fwd(q, k, v, scale, bias, mask, q_len, kv_len, *, causal, groups, bounded,
        deterministic=False, sm90=None):
    """sm90: may the sm_90a kernel run (None: unless JCA_SM90=0)."""
    del deterministic  # the forward is deterministic
    sm90 = sm90_enabled() if sm90 is None else bool(sm90)
    B, T, N, _ = q.shape
    out_types = (_result(q, q.shape, q.dtype, (0, 1, 2, 3)),
                 _result(q, (B, N, T), jnp.float32, (0, 2, 1)))
    call = jax.ffi.ffi_call(FWD_TARGET, out_types, vmap_method="sequential")
    o, lse = call(q, k, v, scale.astype(jnp.float32), *_opts(q, bias, mask, q_len, kv_len),
                  causal=bool(causal), groups=int(groups), bounded=bool(bounded), sm90=sm90)
    return o, lse


def bwd(do, q, k, v, o, lse, scale, bias, mask, q_len, kv_len, *, causal, groups, bounded,
        need_dbias, deterministic, sm90=None, fused_dq=None, q_raw=None, k_raw=None,
        norm_eps=None):
    """sm90: may the sm_90a kernel run (None: unless JCA_SM90=0); fused_dq: the sm_90a backward
    with the fused dQ (None: if JCA_SM90_FUSED_DQ=1).

    norm_eps (with q_raw, k_raw; where `fuses_norm_bwd`): q, k are l2norm(q_raw), l2norm(k_raw)
    (groups 1, this eps) and the kernels apply the l2norm backward in their epilogues. Returns
    (dq, dk, dv, None, rowdot) then: dq, dk the gradients of q_raw, k_raw (input dtype), rowdot
    [B,N,T] f32 = sum_h q * dq_acc (dscale's per-row terms); else (dq_acc, dk, dv, dbias)."""
    sm90 = sm90_enabled() if sm90 is None else bool(sm90)
    fused_dq = sm90_fused_dq_enabled() if fused_dq is None else bool(fused_dq)
    norm = norm_eps is not None
    B, T, N, _ = q.shape
    need_dbias = bool(need_dbias) and bias is not None
    dbias_type = (_result(bias, bias.shape, jnp.float32, (0, 1, 2, 3)) if need_dbias
                  else _result(q, (0,), jnp.float32))
    out_types = (_result(q, q.shape, q.dtype if norm else jnp.float32, (0, 1, 2, 3)),
                 _result(k, k.shape, k.dtype, (0, 1, 2, 3)),
                 _result(v, v.shape, v.dtype, (0, 1, 2, 3)),
                 dbias_type,
                 (_result(q, (B, N, T), jnp.float32, (0, 2, 1)) if norm
                  else _result(q, (0,), jnp.float32)),
                 _result(q, (bwd_workspace_bytes(B, N, T),), jnp.uint8))
    raw = (q_raw, k_raw) if norm else (_empty(q, q.dtype), _empty(k, k.dtype))
    call = jax.ffi.ffi_call(BWD_TARGET, out_types, vmap_method="sequential")
    dq, dk, dv, dbias, rowdot, _ = call(
        do, q, k, v, o, lse, scale.astype(jnp.float32), *_opts(q, bias, mask, q_len, kv_len),
        *raw, causal=bool(causal), groups=int(groups), bounded=bool(bounded),
        need_dbias=need_dbias, deterministic=bool(deterministic), sm90=sm90,
        sm90_fused_dq=fused_dq, norm_eps=np.float32(norm_eps if norm else -1.0))
    if norm:
        return dq, dk, dv, None, rowdot
    return dq, dk, dv, (dbias if need_dbias else None)


def fuses_norm_bwd(head_dim, dtype):
    """Whether `bwd(..., norm_eps=...)` serves this call: the sm_90a two-kernel backward on every
    visible device (sm_90, head dim 64 or 128, bf16/f16; the caller checks: groups 1, no bias or
    mask). JCA_FUSED_NORM_BWD=0 (read at trace) turns it off (A/B)."""
    if not (AVAILABLE and SM90_BUILT and sm90_enabled() and not sm90_fused_dq_enabled()):
        return False
    if os.environ.get("JCA_FUSED_NORM_BWD", "1") == "0":
        return False
    if int(head_dim) not in (64, 128) or np.dtype(dtype) not in DTYPES:
        return False
    ccs = _compute_capabilities()
    return bool(ccs) and all(cc == 90 for cc in ccs)


@functools.lru_cache(maxsize=None)
def _compute_capabilities():
    return tuple(_C.compute_capabilities())
