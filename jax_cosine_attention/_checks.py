"""Argument validation and canonicalisation, done at trace time before any compute.

Everything downstream sees rank-4 q/k/v, rank-4 bias/mask whose dims are each full or 1, an
[N] float32 scale and int32 [B] lengths, so the XLA path and the kernels share one contract.
"""

from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
IMPLEMENTATIONS = (None, "xla", "cuda")


class Canonical(NamedTuple):
    q: jax.Array          # [B,T,N,H]
    k: jax.Array          # [B,S,K,H]
    v: jax.Array          # [B,S,K,Hv]
    scale: jax.Array      # [N] float32
    bias: jax.Array | None   # [Bb,Nb,Tb,Sb], each dim full or 1
    mask: jax.Array | None   # bool, same convention
    q_len: jax.Array | None  # int32 [B]
    kv_len: jax.Array | None
    unbatched: bool


def _shape_error(msg, **arrays):
    shapes = ", ".join(f"{name}{tuple(np.shape(a))}" for name, a in arrays.items())
    return ValueError(f"cosine_sim_attention: {msg} (got {shapes})")


def _broadcast_operand(name, x, full_shape, dims_label):
    """Left-pads x to len(full_shape) dims; each dim must equal the full size or be 1."""
    x = jnp.asarray(x)
    rank = len(full_shape)
    if x.ndim > rank:
        raise ValueError(f"cosine_sim_attention: {name} has rank {x.ndim} but must broadcast to "
                         f"{dims_label}={full_shape}; got {name}{x.shape}")
    x = x.reshape((1,) * (rank - x.ndim) + x.shape)
    for size, full in zip(x.shape, full_shape):
        if size not in (1, full):
            raise ValueError(f"cosine_sim_attention: {name}{x.shape} is not broadcastable to "
                             f"{dims_label}={full_shape}")
    return x


def _lengths(name, x, batch, unbatched):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"cosine_sim_attention: {name} must be an integer array, got dtype {x.dtype}")
    expected = ((), (1,)) if unbatched else ((batch,),)
    if x.shape not in expected:
        raise ValueError(f"cosine_sim_attention: {name} must have shape {expected[-1]} (one length per "
                         f"batch element), got {name}{x.shape}")
    return x.reshape(1 if unbatched else batch).astype(jnp.int32)


def canonicalize(query, key, value, bias, mask, *, scale, groups, query_seq_lengths,
                 key_value_seq_lengths, implementation, allow_float64=False) -> Canonical:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"cosine_sim_attention: unknown implementation {implementation!r}; "
                         f"expected one of {IMPLEMENTATIONS}")
    # Dtypes as given (a float64 numpy array would silently become float32 without x64).
    given = [jnp.dtype(np.result_type(x) if getattr(x, "dtype", None) is None else x.dtype)
             for x in (query, key, value)]
    q, k, v = (jnp.asarray(x) for x in (query, key, value))
    if q.ndim not in (3, 4) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise _shape_error("query, key and value must all be rank 4 [B,T,N,H] / [B,S,K,H] / "
                           "[B,S,K,Hv], or all rank 3 (unbatched)", query=q, key=k, value=v)
    if not (given[0] == given[1] == given[2]):
        raise TypeError(f"cosine_sim_attention: query, key and value dtypes differ: "
                        f"{given[0]}, {given[1]}, {given[2]}")
    allowed = SUPPORTED_DTYPES + ((jnp.dtype(jnp.float64),) if allow_float64 else ())
    if given[0] not in allowed:
        raise TypeError(f"cosine_sim_attention: dtype {given[0]} is not supported; use one of "
                        f"{[str(d) for d in allowed]}")
    unbatched = q.ndim == 3
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    if k.shape[0] != B:
        raise _shape_error("query and key batch sizes differ", query=q, key=k)
    if k.shape[3] != H:
        raise _shape_error("query and key head dims differ", query=q, key=k)
    if v.shape[:3] != k.shape[:3]:
        raise _shape_error("key and value must agree in batch, length and heads", key=k, value=v)
    if K == 0 or N % K:
        raise _shape_error(f"the number of query heads N={N} must be a multiple of the number of "
                           f"key/value heads K={K}", query=q, key=k)
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"cosine_sim_attention: groups must be a positive int, got {groups!r}")
    if H % groups:
        raise _shape_error(f"groups={groups} must divide the head dim H={H}", query=q)

    full = (N, T, S) if unbatched else (B, N, T, S)
    label = "[N,T,S]" if unbatched else "[B,N,T,S]"
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"cosine_sim_attention: mask must be bool (True = attend), got dtype "
                            f"{mask.dtype} and shape {mask.shape}")
        mask = _broadcast_operand("mask", mask, full, label)
        mask = mask[None] if unbatched else mask
    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"cosine_sim_attention: bias must be a float array, got dtype {bias.dtype}")
        bias = _broadcast_operand("bias", bias, full, label)
        bias = bias[None] if unbatched else bias

    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale_n = jnp.full((N,), scale, jnp.float32)
    else:
        s = jnp.asarray(scale)
        if s.shape not in ((), (N,)):
            raise ValueError(f"cosine_sim_attention: scale must be a scalar or have shape [N]=({N},), "
                             f"got shape {s.shape}")
        if not (jnp.issubdtype(s.dtype, jnp.floating) or jnp.issubdtype(s.dtype, jnp.integer)):
            raise TypeError(f"cosine_sim_attention: scale must be real, got dtype {s.dtype}")
        scale_n = jnp.broadcast_to(s.astype(jnp.promote_types(s.dtype, jnp.float32)), (N,))
        if scale_n.dtype != jnp.float64 or not allow_float64:
            scale_n = scale_n.astype(jnp.float32)

    q_len = None if query_seq_lengths is None else _lengths(
        "query_seq_lengths", query_seq_lengths, B, unbatched)
    kv_len = None if key_value_seq_lengths is None else _lengths(
        "key_value_seq_lengths", key_value_seq_lengths, B, unbatched)
    return Canonical(q, k, v, scale_n, bias, mask, q_len, kv_len, unbatched)
