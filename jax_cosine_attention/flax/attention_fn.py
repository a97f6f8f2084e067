"""`attention_fn` drop-in for `flax.linen.MultiHeadDotProductAttention` and `flax.nnx.MultiHeadAttention`.

    nn.MultiHeadDotProductAttention(..., attention_fn=cosine_sim_attention_fn)
    nnx.MultiHeadAttention(..., attention_fn=cosine_sim_attention_fn, rngs=rngs)

Every keyword flax may send is a named parameter: linen filters the kwargs it sends by the
function's signature (so a name hidden in **kwargs would never arrive), nnx sends all of them.
Options of the cosine-sim op (scale, groups, ...) come in through `functools.partial`.
"""

import math

import jax.numpy as jnp

from ..normalize import DEFAULT_EPS
from ._attend import attend, to_rank4
from ._scale import DEFAULT_SCALE

_SUPPORTED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _check_extra(kwargs, qk_attn_weights_einsum, attn_weights_value_einsum):
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
        raise NotImplementedError(
            "cosine_sim_attention_fn: custom qk/value einsums (e.g. AQT quantisation) cannot be "
            "applied inside the fused cosine-sim attention")
    active = {k: v for k, v in kwargs.items() if v is not None and v is not False}
    if active:
        raise TypeError(f"cosine_sim_attention_fn: unsupported arguments {sorted(active)} "
                        "(only accepted when None/False)")


def cosine_sim_attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                            dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                            precision=None, module=None, is_causal=False,
                            force_fp32_for_softmax=False, qk_attn_weights_einsum=None,
                            attn_weights_value_einsum=None, *, scale=DEFAULT_SCALE, groups=1,
                            l2norm_qk=True, implementation=None, eps=DEFAULT_EPS,
                            query_seq_lengths=None, key_value_seq_lengths=None,
                            deterministic_backward=False, **kwargs):
    """Cosine-sim attention with the flax `dot_product_attention` calling convention.

    Args:
      query: [batch..., T, N, H]; key: [batch..., S, K, H]; value: [batch..., S, K, Hv], with any
        number of (identical) leading batch dims, N % K == 0 (GQA, as nnx may send).
      bias: additive, broadcastable to [batch..., N, T, S]; differentiable.
      mask: broadcastable to [batch..., N, T, S]; True / nonzero = attend. Size-1 dims are never
        expanded, so key-padding masks ([.., 1, 1, S]) cost O(S); a full [.., T, S] mask is used
        as a dense mask.
      broadcast_dropout, dropout_rng, dropout_rate, deterministic: flax's attention dropout. When
        `dropout_rate > 0 and not deterministic` the dense XLA path (weights materialised) runs
        with dropout; it is never ignored.
      dtype: computation dtype (q/k/v are cast to it); default: their promoted dtype. Float
        dtypes other than float32, float16 and bfloat16 (e.g. float64) compute in float32.
      precision: ignored (the op accumulates in float32).
      module: if given (flax's `sow_weights=True`), the dense path runs and the [batch..., N, T,
        S] weights are sown as 'attention_weights' (linen: 'intermediates'; nnx: nnx.Intermediate).
      is_causal: causal masking, bottom-right aligned (query i sees keys j <= i + S - T); the
        same as flax's top-left tril when T == S.
      force_fp32_for_softmax: accepted; the softmax is always float32.
      qk_attn_weights_einsum, attn_weights_value_einsum: must be None (raise otherwise).
      scale, groups, l2norm_qk, implementation, eps, query_seq_lengths, key_value_seq_lengths:
        as in `cosine_sim_attention` (bind them with functools.partial). Lengths are [batch...].
      deterministic_backward: the op's `deterministic` (fixed-order CUDA backward).
      **kwargs: future flax keywords; accepted only while None/False, otherwise TypeError.

    Returns:
      [batch..., T, N, Hv] in the computation dtype.
    """
    del precision, force_fp32_for_softmax
    _check_extra(kwargs, qk_attn_weights_einsum, attn_weights_value_einsum)
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    if dtype is None:
        dtype = jnp.result_type(query, key, value)
    dtype = jnp.dtype(dtype)
    if dtype not in _SUPPORTED:
        dtype = jnp.dtype(jnp.float32)
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError("cosine_sim_attention_fn: query, key, value must be [batch..., L, heads, "
                         f"depth] with the same rank; got {query.shape}, {key.shape}, {value.shape}")
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
        raise ValueError("cosine_sim_attention_fn: query, key and value batch dims differ: "
                         f"{query.shape}, {key.shape}, {value.shape}")
    B = math.prod(batch_shape)
    q = query.reshape((B,) + query.shape[-3:])
    k = key.reshape((B,) + key.shape[-3:])
    v = value.reshape((B,) + value.shape[-3:])
    lengths = [None if x is None else jnp.asarray(x).reshape(B)
               for x in (query_seq_lengths, key_value_seq_lengths)]

    sow = None
    if module is not None:
        def sow(weights):
            weights = weights.reshape(batch_shape + weights.shape[1:])
            import flax.linen as nn  # noqa: PLC0415  (which flavour of module is it?)
            if isinstance(module, nn.Module):
                module.sow("intermediates", "attention_weights", weights)
            else:
                from flax import nnx  # noqa: PLC0415
                module.sow(nnx.Intermediate, "attention_weights", weights)

    out = attend(q, k, v, scale=scale,
                 bias=to_rank4("bias", bias, batch_shape, B),
                 mask=to_rank4("mask", mask, batch_shape, B, bool_mask=True),
                 is_causal=is_causal, q_len=lengths[0], kv_len=lengths[1], groups=groups,
                 l2norm_qk=l2norm_qk, eps=eps, implementation=implementation,
                 deterministic_backward=deterministic_backward, dropout_rate=dropout_rate,
                 dropout_rng=dropout_rng, broadcast_dropout=broadcast_dropout,
                 deterministic=deterministic, sow=sow)
    return out.reshape(batch_shape + out.shape[1:])
