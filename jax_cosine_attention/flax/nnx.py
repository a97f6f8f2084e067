"""`CosineSimAttention` for flax.nnx: a multi-head attention layer with cosine-sim attention.

Sub-modules mirror `nnx.MultiHeadAttention` ('query'/'key'/'value'/'out' LinearGeneral, kernels
[D,N,H] / [D,K,H] / [N,H,Do]), so its weights transfer as is, plus an optional per-head
`logit_scale` [N]. Written against the nnx API shared by the flax releases this package supports
(`nnx.with_partitioning`, `nnx.Cache`, get/set through `get_value`/`set_value` where present).
"""

from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx
from flax.linen.attention import default_kernel_init

from ..normalize import DEFAULT_EPS
from . import _decode
from ._scale import DEFAULT_SCALE, DEFAULT_SCALE_MAX, learned_scale, logit_scale_init
from ._sharding import LogicalAxes, constrain, out_names, out_sharding
from .attention_fn import cosine_sim_attention_fn

_data = getattr(nnx, "data", lambda x: x)  # marks a pytree-data attribute (newer nnx)


def _partitioned(init, names):
    """Logical-name annotation. Never sharded eagerly at creation (newer nnx would need a mesh
    with these very axis names); shard with `nnx.get_partition_spec` under logical axis rules."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def _get(var):
    return var.get_value() if hasattr(var, "get_value") else var.value


def _set(var, value):
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


def _dropout_key(rngs):
    if rngs is None:
        return None
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    if callable(rngs):  # an RngStream
        return rngs()
    return rngs  # a PRNG key


class CosineSimAttention(nnx.Module):
    """Multi-head cosine-sim attention: logits = scale_n * <l2norm(q), l2norm(k)> + bias.

    Args:
      num_heads: query heads N. in_features: input size D.
      qkv_features: N * head_dim (default D). out_features: default D.
      num_kv_heads: key/value heads K (N % K == 0; default N). in_kv_features: default D.
      scale: the fixed scale, or with `learned_scale=True` the initial value of a per-head scale
        exp(min(logit_scale, log(scale_max))) (SwinV2/VAR; `logit_scale` param [N] = log(scale)).
      groups, l2norm_qk, eps, implementation: as in `cosine_sim_attention`.
      is_causal: default causal flag (bottom-right aligned); `__call__(is_causal=...)` overrides.
      dropout_rate, broadcast_dropout, deterministic: attention dropout (dense XLA path while on).
      decode: default for `__call__(decode=...)`; call `init_cache` first.
      use_bias, dtype, param_dtype, precision, kernel_init, out_kernel_init, bias_init: as in
        `nnx.MultiHeadAttention`.
      logical_axes: names for `nnx.with_partitioning` (kernels (embed, heads|kv_heads, kv), out
        kernel (heads, kv, embed), logit_scale (heads,)) and the activation constraints
        (q (batch, length, heads, kv), k/v (batch, length, kv_heads, kv)).
      rngs: `nnx.Rngs` for parameters; its dropout stream is kept when dropout_rate > 0.
    """

    def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
                 out_features: int | None = None, num_kv_heads: int | None = None,
                 in_kv_features: int | None = None, *, scale: float = DEFAULT_SCALE,
                 learned_scale: bool = False, scale_max: float = DEFAULT_SCALE_MAX,
                 groups: int = 1, l2norm_qk: bool = True, eps: float = DEFAULT_EPS,
                 implementation: str | None = None, deterministic_backward: bool = False,
                 is_causal: bool = False, dropout_rate: float = 0.0,
                 broadcast_dropout: bool = True, deterministic: bool | None = None,
                 decode: bool = False, use_bias: bool = True, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = default_kernel_init,
                 out_kernel_init: Callable | None = None,
                 bias_init: Callable = nnx.initializers.zeros_init(),
                 logical_axes: LogicalAxes = LogicalAxes(), rngs: nnx.Rngs):
        qkv_features = qkv_features or in_features
        num_kv_heads = num_kv_heads or num_heads
        if qkv_features % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"CosineSimAttention: qkv_features={qkv_features} must be divisible by "
                             f"num_heads={num_heads}, and num_heads by num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.in_features = in_features
        self.head_dim = qkv_features // num_heads
        self.out_features = out_features or in_features
        self.scale, self.learned_scale, self.scale_max = scale, learned_scale, scale_max
        self.groups, self.l2norm_qk, self.eps = groups, l2norm_qk, eps
        self.implementation, self.deterministic_backward = implementation, deterministic_backward
        self.is_causal, self.decode = is_causal, decode
        self.dropout_rate, self.broadcast_dropout = dropout_rate, broadcast_dropout
        self.deterministic, self.dtype = deterministic, dtype
        self.logical_axes = logical_axes
        ax = logical_axes
        H = self.head_dim

        def linear(d_in, d_out, names, axis=-1, init=kernel_init):
            bias_names = names[-len(d_out):] if isinstance(d_out, tuple) else (ax.embed,)
            return nnx.LinearGeneral(
                d_in, d_out, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                precision=precision, kernel_init=_partitioned(init, names),
                bias_init=_partitioned(bias_init, bias_names), rngs=rngs)

        kv_in = in_kv_features or in_features
        self.query = linear(in_features, (num_heads, H), (ax.embed, ax.heads, ax.head_dim))
        self.key = linear(kv_in, (num_kv_heads, H), (ax.embed, ax.kv_heads, ax.head_dim))
        self.value = linear(kv_in, (num_kv_heads, H), (ax.embed, ax.kv_heads, ax.head_dim))
        self.out = linear((num_heads, H), self.out_features, (ax.heads, ax.head_dim, ax.embed),
                          axis=(-2, -1), init=out_kernel_init or kernel_init)
        self.logit_scale = _data(None)
        if learned_scale:
            init = _partitioned(logit_scale_init(scale), (ax.heads,))
            self.logit_scale = nnx.Param(init(rngs.params(), (num_heads,), param_dtype))
        self.rngs = _data(None)
        if dropout_rate > 0:
            stream = rngs.dropout
            self.rngs = stream.fork() if hasattr(stream, "fork") else stream
        self.cached_key = _data(None)
        self.cached_value = _data(None)
        self.cache_index = _data(None)

    def init_cache(self, input_shape, dtype: Any = jnp.float32):
        """Creates the decode cache for inputs of shape [batch..., max_length, features]."""
        shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, bias=None, mask=None,
                 is_causal: bool | None = None, query_seq_lengths=None,
                 key_value_seq_lengths=None, deterministic: bool | None = None, rngs=None,
                 sow_weights: bool = False, decode: bool | None = None):
        """inputs_q [batch..., T, D]; inputs_k / inputs_v [batch..., S, D] (default: inputs_q).

        bias: additive, broadcastable to [batch..., N, T, S] (differentiable). mask: broadcastable
        to [batch..., N, T, S], True = attend. decode: append T >= 1 tokens to the cache (see
        `init_cache`) and attend causally to everything cached so far. rngs: dropout randomness
        (nnx.Rngs, an RngStream or a key); default the stream kept at construction.
        Returns [batch..., T, out_features].
        """
        ax = self.logical_axes
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        q = constrain(self.query(inputs_q), (ax.batch, ax.length, ax.heads, ax.head_dim))
        k = constrain(self.key(inputs_k), (ax.batch, ax.length, ax.kv_heads, ax.head_dim))
        v = constrain(self.value(inputs_v), (ax.batch, ax.length, ax.kv_heads, ax.head_dim))

        scale = self.scale
        if self.learned_scale:
            scale = learned_scale(_get(self.logit_scale), self.scale_max)
        causal = self.is_causal if is_causal is None else is_causal
        kv_len = key_value_seq_lengths
        if self.decode if decode is None else decode:
            k, v, kv_len, mask = self._update_cache(q, k, v, kv_len, mask)
            causal = False

        deterministic = self.deterministic if deterministic is None else deterministic
        dropout_rng = None
        if self.dropout_rate > 0.0:
            if deterministic is None:
                raise ValueError("CosineSimAttention: dropout_rate > 0 needs `deterministic` "
                                 "(constructor or call)")
            if not deterministic:
                dropout_rng = _dropout_key(rngs if rngs is not None else self.rngs)
                if dropout_rng is None:
                    raise ValueError("CosineSimAttention: dropout needs rngs (none were kept)")
        x = cosine_sim_attention_fn(
            q, k, v, bias, mask, broadcast_dropout=self.broadcast_dropout, dropout_rng=dropout_rng,
            dropout_rate=self.dropout_rate, deterministic=bool(deterministic), dtype=self.dtype,
            module=self if sow_weights else None, is_causal=causal, scale=scale,
            groups=self.groups, l2norm_qk=self.l2norm_qk, implementation=self.implementation,
            eps=self.eps, query_seq_lengths=query_seq_lengths, key_value_seq_lengths=kv_len,
            deterministic_backward=self.deterministic_backward)
        x = constrain(x, (ax.batch, ax.length, ax.heads, ax.head_dim))
        spec = out_sharding(out_names(ax, x))
        return self.out(x) if spec is None else self.out(x, out_sharding=spec)

    def _update_cache(self, q, k, v, kv_len, mask):
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError("CosineSimAttention: decode needs `init_cache` first")
        k, v, kv_len, mask, index = _decode.append(
            _get(self.cached_key), _get(self.cached_value), _get(self.cache_index), q, k, v,
            kv_len, mask)
        _set(self.cached_key, k)
        _set(self.cached_value, v)
        _set(self.cache_index, index)
        return k, v, kv_len, mask
