"""Pieces shared by the linen and nnx modules and the attention_fn adapter."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..api import cosine_sim_attention
from ..normalize import DEFAULT_EPS
from ._dense import dense_cosine_attention

DEFAULT_SCALE = 10.0   # fixed scale, and the learned scale's initial value (log-parameterised)
DEFAULT_SCALE_MAX = 100.0  # SwinV2/VAR clamp of the learned scale


class LogicalAxes(NamedTuple):
    """Logical axis names used for parameter and activation sharding annotations.

    Map them to mesh axes with `flax.linen.logical_axis_rules` (shared by linen and nnx), e.g.
    `[("batch", "data"), ("heads", "model"), ("kv_heads", "model")]`. Without rules the
    annotations do nothing.
    """
    batch: str | None = "batch"
    length: str | None = "length"
    embed: str | None = "embed"
    heads: str | None = "heads"
    kv_heads: str | None = "kv_heads"
    head_dim: str | None = "kv"


def learned_scale(logit_scale, scale_max=DEFAULT_SCALE_MAX):
    """exp(min(logit_scale, log(scale_max))): the SwinV2 parameterisation (no gradient above the clamp)."""
    return jnp.exp(jnp.minimum(logit_scale, math.log(scale_max)))


def logit_scale_init(scale):
    """Initializer for a per-head log-scale parameter: every entry log(scale)."""
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, math.log(scale), dtype)
    return init


def _explicit_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not mesh.are_all_axes_explicit else mesh


def _mesh_spec(names):
    """PartitionSpec for logical names under the active rules, or None without rules."""
    if not nn.get_logical_axis_rules():
        return None
    return nn.logical_to_mesh_axes(names)


def constrain(x, names):
    """Logical sharding constraint for [B, L, heads, dim] activations; a no-op without rules/mesh.

    Auto meshes: `nn.with_logical_constraint`. Explicit meshes: `jax.sharding.reshard`. Names are
    dropped for dims of size 1 (e.g. MQA's single kv head), and nothing is done unless there is
    exactly one leading batch dim.
    """
    if x.ndim != len(names):
        return x
    names = tuple(None if d == 1 else n for d, n in zip(x.shape, names))
    if _explicit_mesh() is None:
        return nn.with_logical_constraint(x, names)
    spec = _mesh_spec(names)
    return x if spec is None else jax.sharding.reshard(x, spec)


def out_sharding(names):
    """`out_sharding` for the output projection on an Explicit mesh (its contraction runs over the
    sharded heads, which Explicit mode will not resolve on its own); None otherwise."""
    return None if _explicit_mesh() is None else _mesh_spec(names)


def out_names(ax, x):
    """Logical names of the output projection's result [batch..., L, features]."""
    return (ax.batch, ax.length, ax.embed) if x.ndim == 4 else (None,) * (x.ndim - 1)


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


def combine_masks(*masks):
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


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
