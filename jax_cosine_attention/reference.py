"""Dense cosine-sim attention written for clarity: the test oracle (float64-capable) and the
path for tiny shapes. It materialises the [B,N,T,S] logits; use `cosine_sim_attention` for real work."""

import jax
import jax.numpy as jnp

from ._checks import canonicalize
from ._masking import valid_pairs
from .normalize import DEFAULT_EPS, l2norm


def attention_core_reference(q, k, v, scale, bias, mask, q_len, kv_len, *, is_causal):
    """Core semantics on canonical inputs (see `_checks.Canonical`); returns (out, lse [B,N,T])."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    compute = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.astype(compute).reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(compute))
    logits = logits.reshape(B, N, T, S) * scale.astype(compute)[None, :, None, None]
    if bias is not None:
        logits = logits + bias.astype(compute)
    ok = valid_pairs(jnp.arange(T), jnp.arange(S), T=T, S=S, is_causal=is_causal,
                     q_len=q_len, kv_len=kv_len, mask=mask)
    ok = jnp.broadcast_to(ok, logits.shape)
    row_max = jnp.max(jnp.where(ok, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0)
    p = jnp.where(ok, jnp.exp(logits - row_max), 0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    has_key = denom > 0
    weights = jnp.where(has_key, p / jnp.where(has_key, denom, 1), 0)
    out = jnp.einsum("bkgts,bskh->btkgh", weights.reshape(B, K, N // K, T, S),
                     v.astype(compute)).reshape(B, T, N, v.shape[-1])
    lse = jnp.where(has_key[..., 0], row_max[..., 0] + jnp.log(jnp.where(has_key[..., 0], denom[..., 0], 1)),
                    -jnp.inf)
    return out.astype(q.dtype), lse.astype(jnp.promote_types(compute, jnp.float32))


def cosine_sim_attention_reference(query, key, value, bias=None, mask=None, *, scale=10.0, groups=1,
                                   l2norm_qk=True, is_causal=False, query_seq_lengths=None,
                                   key_value_seq_lengths=None, eps=DEFAULT_EPS):
    """Same signature and semantics as `cosine_sim_attention`; also accepts float64 inputs."""
    c = canonicalize(query, key, value, bias, mask, scale=scale, groups=groups,
                     query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                     implementation=None, allow_float64=True)
    q, k = (l2norm(c.q, groups, eps), l2norm(c.k, groups, eps)) if l2norm_qk else (c.q, c.k)
    out, _ = attention_core_reference(q, k, c.v, c.scale, c.bias, c.mask, c.q_len, c.kv_len,
                                      is_causal=is_causal)
    return out[0] if c.unbatched else out
