"""Canonical-layout dispatch (fused op or dense path) and flax-layout operand reshaping."""

import jax.numpy as jnp

from ..api import cosine_sim_attention
from ..normalize import DEFAULT_EPS
from ._dense import dense_cosine_attention


def to_rank4(name, x, batch_shape, B, *, bool_mask=False):
    """[batch..., N|1, T|1, S|1] (any rank <= nb+3, broadcastable) -> rank 4 with B or 1 leading.

    Size-1 dims are kept: a key-padding mask [B,1,1,S] (e.g. flax's decode mask) reaches the op
    as is, and only a mask that is itself [.., T, S] is a dense mask there.
    """
    if x is None:
        return None
    x = jnp.asarray(x)
    if bool_mask and x.dtype != jnp.bool_:
        x = x != 0  # flax masks are often float 0/1 (nn.make_attention_mask, combine_masks)
    nb = len(batch_shape)
    if x.ndim > nb + 3:
        raise ValueError(f"{name} of shape {x.shape} has more dims than "
                         f"[batch..., heads, q_len, kv_len] with batch dims {batch_shape}")
    x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
    lead, rest = x.shape[:nb], x.shape[nb:]
    if all(d == 1 for d in lead):
        return x.reshape((1,) + rest)
    if lead != tuple(batch_shape):
        x = jnp.broadcast_to(x, tuple(batch_shape) + rest)
    return x.reshape((B,) + rest)


def attend(query, key, value, *, scale, bias=None, mask=None, is_causal=False, q_len=None,
           kv_len=None, groups=1, l2norm_qk=True, eps=DEFAULT_EPS, implementation=None,
           deterministic_backward=False, dropout_rate=0.0, dropout_rng=None,
           broadcast_dropout=True, deterministic=True, sow=None):
    """Canonical-layout attention: q [B,T,N,H], k/v [B,S,K,H|Hv], bias/mask rank 4.

    Uses the fused op unless dropout is active or `sow` (a callable taking the [B,N,T,S] weights)
    is given; then the dense XLA path (`_dense`) that materialises the weights.
    """
    use_dropout = dropout_rate > 0.0 and not deterministic
    if use_dropout or sow is not None:
        out, weights = dense_cosine_attention(
            query, key, value, scale, bias, mask, is_causal=is_causal, q_len=q_len,
            kv_len=kv_len, groups=groups, l2norm_qk=l2norm_qk, eps=eps,
            dropout_rate=dropout_rate, dropout_rng=dropout_rng,
            broadcast_dropout=broadcast_dropout, deterministic=deterministic)
        if sow is not None:
            sow(weights)
        return out
    return cosine_sim_attention(query, key, value, bias, mask, scale=scale, groups=groups,
                                l2norm_qk=l2norm_qk, is_causal=is_causal, query_seq_lengths=q_len,
                                key_value_seq_lengths=kv_len, implementation=implementation,
                                deterministic=deterministic_backward, eps=eps)
