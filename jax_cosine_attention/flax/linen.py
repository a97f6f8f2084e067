"""`CosineSimAttention` for flax.linen: a multi-head attention layer with cosine-sim attention.

Parameters mirror `nn.MultiHeadDotProductAttention` ('query'/'key'/'value'/'out' DenseGeneral
kernels [D,N,H] / [N,H,Do]), so an MHA checkpoint (num_kv_heads == num_heads) loads as is, plus
an optional per-head 'logit_scale' [N].
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.linen.attention import default_kernel_init
from flax.linen.dtypes import promote_dtype

from ..normalize import DEFAULT_EPS
from . import _decode
from ._scale import DEFAULT_SCALE, DEFAULT_SCALE_MAX, learned_scale, logit_scale_init
from ._sharding import LogicalAxes, constrain, out_names, out_sharding
from .attention_fn import cosine_sim_attention_fn


def _flat_init(init, n_in):
    """Initialises like nn.DenseGeneral (on the [prod(in), prod(out)] matrix), then reshapes."""
    def f(key, shape, dtype=jnp.float32):
        flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:])) if n_in else (math.prod(shape),)
        return jnp.reshape(init(key, flat, dtype), shape)
    return f


class _Projection(nn.Module):
    """nn.DenseGeneral over the last `n_in` axes, with logically partitioned params.

    (nn.DenseGeneral boxes its kernel before reshaping it, which breaks logical partitioning of
    a 3-D kernel under a mesh; params and init values here are the same as DenseGeneral's.)
    """
    features: tuple
    n_in: int
    names: tuple
    use_bias: bool
    dtype: Any
    param_dtype: Any
    precision: Any
    kernel_init: Callable
    bias_init: Callable

    @nn.compact
    def __call__(self, x, out_sharding=None):
        in_shape = x.shape[x.ndim - self.n_in:]
        kernel = self.param("kernel", nn.with_logical_partitioning(
            _flat_init(self.kernel_init, self.n_in), self.names), in_shape + self.features,
            self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                _flat_init(self.bias_init, 0), self.names[self.n_in:]), self.features,
                self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        dims = ((tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ()))
        extra = {} if out_sharding is None else dict(out_sharding=out_sharding)
        y = jax.lax.dot_general(x, kernel, dims, precision=self.precision, **extra)
        return y if bias is None else y + bias


class CosineSimAttention(nn.Module):
    """Multi-head cosine-sim attention: logits = scale_n * <l2norm(q), l2norm(k)> + bias.

    Attributes:
      num_heads: query heads N. num_kv_heads: key/value heads K (N % K == 0; default N).
      qkv_features: N * head_dim (default: the input feature size). out_features: default D.
      scale: the fixed scale, or with `learned_scale=True` the initial value of a per-head scale
        exp(min(logit_scale, log(scale_max))) (SwinV2/VAR; 'logit_scale' param [N] = log(scale)).
      groups, l2norm_qk, eps, implementation: as in `cosine_sim_attention`.
      is_causal: default causal flag (bottom-right aligned); `__call__(is_causal=...)` overrides.
      dropout_rate, broadcast_dropout, deterministic: attention dropout (dense XLA path while on).
      decode: autoregressive decoding against a 'cache' collection (see `__call__`).
      use_bias: biases in the q/k/v/out projections. dtype / param_dtype: computation / params.
      logical_axes: names for `nn.with_logical_partitioning` / activation constraints: kernels
        (embed, heads|kv_heads, kv), out kernel (heads, kv, embed), logit_scale (heads,),
        q (batch, length, heads, kv), k/v (batch, length, kv_heads, kv).
    """
    num_heads: int
    num_kv_heads: int | None = None
    qkv_features: int | None = None
    out_features: int | None = None
    scale: float = DEFAULT_SCALE
    learned_scale: bool = False
    scale_max: float = DEFAULT_SCALE_MAX
    groups: int = 1
    l2norm_qk: bool = True
    eps: float = DEFAULT_EPS
    implementation: str | None = None
    deterministic_backward: bool = False
    is_causal: bool = False
    dropout_rate: float = 0.0
    broadcast_dropout: bool = True
    deterministic: bool | None = None
    decode: bool = False
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = default_kernel_init
    out_kernel_init: Callable | None = None
    bias_init: Callable = nn.initializers.zeros_init()
    logical_axes: LogicalAxes = LogicalAxes()

    def _dense(self, features, n_in, names, name, kernel_init=None):
        return _Projection(features=features, n_in=n_in, names=names, use_bias=self.use_bias,
                           dtype=self.dtype, param_dtype=self.param_dtype,
                           precision=self.precision, kernel_init=kernel_init or self.kernel_init,
                           bias_init=self.bias_init, name=name)

    @nn.compact
    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, bias=None, mask=None,
                 is_causal=None, query_seq_lengths=None, key_value_seq_lengths=None,
                 deterministic=None, dropout_rng=None, sow_weights=False):
        """inputs_q [batch..., T, D]; inputs_k / inputs_v [batch..., S, D] (default: inputs_q).

        bias: additive, broadcastable to [batch..., N, T, S] (differentiable; e.g. a learned
        relative-position bias). mask: broadcastable to [batch..., N, T, S], True = attend.
        With `decode=True`: `init` with a full-length input creates the cache ('cached_key',
        'cached_value' [batch..., max_len, K, H], 'cache_index'); each later call (mutable
        ['cache']) appends T >= 1 tokens and attends causally to everything cached so far.
        Returns [batch..., T, out_features].
        """
        ax = self.logical_axes
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        features = self.out_features or inputs_q.shape[-1]
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        N = self.num_heads
        K = self.num_kv_heads or N
        if qkv_features % N or N % K:
            raise ValueError(f"CosineSimAttention: qkv_features={qkv_features} must be divisible by "
                             f"num_heads={N}, and num_heads by num_kv_heads={K}")
        H = qkv_features // N
        q = self._dense((N, H), 1, (ax.embed, ax.heads, ax.head_dim), "query")(inputs_q)
        k = self._dense((K, H), 1, (ax.embed, ax.kv_heads, ax.head_dim), "key")(inputs_k)
        v = self._dense((K, H), 1, (ax.embed, ax.kv_heads, ax.head_dim), "value")(inputs_v)
        q = constrain(q, (ax.batch, ax.length, ax.heads, ax.head_dim))
        k = constrain(k, (ax.batch, ax.length, ax.kv_heads, ax.head_dim))
        v = constrain(v, (ax.batch, ax.length, ax.kv_heads, ax.head_dim))

        scale = self.scale
        if self.learned_scale:
            logit_scale = self.param(
                "logit_scale", nn.with_logical_partitioning(logit_scale_init(self.scale), (ax.heads,)),
                (N,), self.param_dtype)
            scale = learned_scale(logit_scale, self.scale_max)

        causal = self.is_causal if is_causal is None else is_causal
        kv_len = key_value_seq_lengths
        if self.decode:
            k, v, kv_len, mask, causal = self._update_cache(q, k, v, kv_len, mask, causal)

        m_deterministic = True
        if self.dropout_rate > 0.0:
            m_deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not m_deterministic and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        x = cosine_sim_attention_fn(
            q, k, v, bias, mask, broadcast_dropout=self.broadcast_dropout, dropout_rng=dropout_rng,
            dropout_rate=self.dropout_rate, deterministic=m_deterministic, dtype=self.dtype,
            module=self if sow_weights else None, is_causal=causal, scale=scale,
            groups=self.groups, l2norm_qk=self.l2norm_qk, implementation=self.implementation,
            eps=self.eps, query_seq_lengths=query_seq_lengths, key_value_seq_lengths=kv_len,
            deterministic_backward=self.deterministic_backward)
        x = constrain(x, (ax.batch, ax.length, ax.heads, ax.head_dim))
        return self._dense((features,), 2, (ax.heads, ax.head_dim, ax.embed), "out",
                           self.out_kernel_init)(x, out_sharding(out_names(ax, x)))

    def _update_cache(self, q, k, v, kv_len, mask, causal):
        is_initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not is_initialized:  # init: plain attention over the full-length input
            return k, v, kv_len, mask, causal
        k, v, kv_len, mask, cache_index.value = _decode.append(
            cached_key.value, cached_value.value, cache_index.value, q, k, v, kv_len, mask)
        cached_key.value, cached_value.value = k, v
        return k, v, kv_len, mask, False
