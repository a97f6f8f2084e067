"""Autoregressive decoding against a fixed-size [batch..., max_len, K, H] key/value cache."""

import math

import jax
import jax.numpy as jnp


def decode_positions(cur_index, T, S, B):
    """kv lengths [B] and, for T > 1, a [1,1,T,S] mask for queries at cur_index..cur_index+T-1.

    Query t (absolute position cur_index + t) sees cache slots 0..cur_index + t. For T == 1 this
    is a pure length, so no mask is built.
    """
    kv_len = jnp.broadcast_to(jnp.asarray(cur_index + T, jnp.int32), (B,))
    if T == 1:
        return kv_len, None
    t = jnp.arange(T)[:, None]
    s = jnp.arange(S)[None, :]
    return kv_len, (s <= cur_index + t)[None, None]


def append(cache_k, cache_v, cur_index, q, k, v, kv_len=None, mask=None):
    """Writes k/v [batch..., T, K, H] at cur_index; returns what attention needs for the step.

    Returns (keys, values, kv lengths [batch...], mask, new cache index). The queries then attend
    causally to everything cached so far (no separate is_causal), which for T == 1 is a length.
    """
    *batch, S, _, _ = cache_k.shape
    T = q.shape[-3]
    if tuple(batch) != q.shape[:-3] or k.shape[-3] != T:
        raise ValueError(f"CosineSimAttention decode: cache is {cache_k.shape}, got query "
                         f"{q.shape} and key {k.shape} (self-attention, same batch)")
    zero = jnp.array(0, jnp.int32)
    idx = (zero,) * len(batch) + (cur_index, zero, zero)
    k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), idx)
    v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), idx)
    lengths, step_mask = decode_positions(cur_index, T, S, math.prod(batch))
    lengths = lengths.reshape(tuple(batch))
    if kv_len is not None:
        lengths = jnp.minimum(lengths, jnp.asarray(kv_len, jnp.int32))
    if step_mask is not None:
        mask = step_mask if mask is None else jnp.logical_and(jnp.asarray(mask) != 0, step_mask)
    return k, v, lengths, mask, cur_index + T
