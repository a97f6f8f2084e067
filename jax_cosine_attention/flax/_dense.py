"""Dense cosine-sim attention that materialises the [B,N,T,S] weights.

Used only where the fused op cannot serve a call: attention dropout (the op has none) and
sowing the attention weights. Same semantics as `cosine_sim_attention` (bottom-right causal,
rows with no valid key output 0, query rows past `query_seq_lengths` output 0), written in plain
jnp on top of `l2norm`, with the softmax in float32. Memory is O(B*N*T*S).
"""

import jax
import jax.numpy as jnp

from ..normalize import DEFAULT_EPS, l2norm


def _valid(B, N, T, S, *, mask, is_causal, q_len, kv_len):
    t = jnp.arange(T)[:, None]
    s = jnp.arange(S)[None, :]
    ok = jnp.ones((1, 1, T, S), bool)
    if is_causal:
        ok = ok & (s <= t + (S - T))[None, None]
    if kv_len is not None:
        ok = ok & (s[None, None] < kv_len.reshape(-1, 1, 1, 1))
    if q_len is not None:
        ok = ok & (t[None, None] < q_len.reshape(-1, 1, 1, 1))
    if mask is not None:
        ok = ok & mask
    return ok


def cosine_attention_weights(query, key, scale, bias=None, mask=None, *, is_causal=False,
                             q_len=None, kv_len=None, groups=1, l2norm_qk=True, eps=DEFAULT_EPS):
    """Softmax weights [B,N,T,S] (float32) for q [B,T,N,H], k [B,S,K,H] (N % K == 0).

    scale: scalar or [N]. bias / mask: broadcastable to [B,N,T,S] (mask bool, True = attend).
    """
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    if l2norm_qk:
        query, key = l2norm(query, groups, eps), l2norm(key, groups, eps)
    f32 = jnp.promote_types(query.dtype, jnp.float32)
    qg = query.astype(f32).reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, key.astype(f32)).reshape(B, N, T, S)
    scale = jnp.broadcast_to(jnp.asarray(scale, f32), (N,))
    logits = logits * scale[None, :, None, None]
    if bias is not None:
        logits = logits + bias.astype(f32)
    ok = jnp.broadcast_to(_valid(B, N, T, S, mask=mask, is_causal=is_causal, q_len=q_len,
                                 kv_len=kv_len), logits.shape)
    row_max = jnp.max(jnp.where(ok, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0))
    p = jnp.where(ok, jnp.exp(logits - row_max), 0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1)


def dense_cosine_attention(query, key, value, scale, bias=None, mask=None, *, is_causal=False,
                           q_len=None, kv_len=None, groups=1, l2norm_qk=True, eps=DEFAULT_EPS,
                           dropout_rate=0.0, dropout_rng=None, broadcast_dropout=True,
                           deterministic=True):
    """Returns (out [B,T,N,Hv] in query's dtype, weights [B,N,T,S] before dropout).

    Dropout as in flax: when `dropout_rate > 0 and not deterministic`, weights are zeroed with
    probability `dropout_rate` and the rest scaled by 1/(1-rate); `broadcast_dropout` shares one
    [T,S] dropout mask across batch and heads.
    """
    weights = cosine_attention_weights(query, key, scale, bias, mask, is_causal=is_causal,
                                       q_len=q_len, kv_len=kv_len, groups=groups,
                                       l2norm_qk=l2norm_qk, eps=eps)
    used = weights
    if dropout_rate > 0.0 and not deterministic:
        if dropout_rng is None:
            raise ValueError("cosine-sim attention dropout needs a dropout_rng (dropout_rate="
                             f"{dropout_rate}, deterministic=False)")
        keep_prob = 1.0 - dropout_rate
        shape = (1, 1) + weights.shape[-2:] if broadcast_dropout else weights.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        used = jnp.where(keep, weights / keep_prob, 0) if keep_prob > 0 else jnp.zeros_like(weights)
    B, T, N = query.shape[:3]
    K = key.shape[2]
    out = jnp.einsum("bkgts,bskh->btkgh", used.reshape(B, K, N // K, T, weights.shape[-1]),
                     value.astype(used.dtype))
    return out.reshape(B, T, N, value.shape[-1]).astype(query.dtype), weights
