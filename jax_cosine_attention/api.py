"""Public entry points: `cosine_sim_attention` and its `shard_map` wrapper."""

import jax
from jax.sharding import PartitionSpec as P

from . import _cuda
from ._checks import canonicalize
from ._ops import Config, OPTIONALS, attention_core
from .normalize import DEFAULT_EPS, l2norm


def _resolve_implementation(implementation, c):
    """'xla' or 'cuda'. Raises for an explicit 'cuda' the kernel cannot serve."""
    if implementation == "xla":
        return "xla"
    reason = None
    if not _cuda.AVAILABLE:
        reason = f"the CUDA extension is not available ({_cuda.IMPORT_ERROR})"
    else:
        reason = _cuda.unsupported_reason(
            c.q.shape, c.k.shape, c.v.shape, c.q.dtype,
            None if c.bias is None else c.bias.shape, None if c.bias is None else c.bias.dtype,
            None if c.mask is None else c.mask.shape)
    if implementation == "cuda":
        if reason is None and jax.default_backend() != "gpu":
            reason = f"the default backend is {jax.default_backend()!r}, not a CUDA GPU"
        if reason is not None:
            raise ValueError(f"cosine_sim_attention: implementation='cuda' cannot serve this call: "
                             f"{reason}. Use implementation=None to fall back to the XLA path.")
    return "cuda" if reason is None else "xla"


def cosine_sim_attention(query, key, value, bias=None, mask=None, *, scale=10.0, groups: int = 1,
                         l2norm_qk: bool = True, is_causal: bool = False, query_seq_lengths=None,
                         key_value_seq_lengths=None, implementation=None,
                         deterministic: bool = False, eps: float = DEFAULT_EPS):
    """Cosine-similarity attention with the calling convention of `jax.nn.dot_product_attention`.

    logits = scale[n] * <l2norm(q), l2norm(k)> + bias; softmax over valid keys; then @ value.

    Args:
      query: [B,T,N,H] (or unbatched [T,N,H]); key: [B,S,K,H]; value: [B,S,K,Hv]. N % K == 0
        (query head n uses kv head n // (N // K)). f32, f16 or bf16, all the same dtype.
      bias: additive, broadcastable to [B,N,T,S]; differentiable (gradient in its own shape).
      mask: bool, True = attend, broadcastable to [B,N,T,S]. Broadcast dims are never expanded.
      scale: Python float, scalar or [N] array (may be traced/learned). Default 10.
      groups: l2-normalise each of `groups` equal chunks of the head dim separately.
      l2norm_qk: False if q and k are already normalised (e.g. `l2norm`, then rotary).
      is_causal: bottom-right aligned: query i sees key j iff j <= i + S - T.
      query_seq_lengths / key_value_seq_lengths: int32 [B]; keys j >= kv_len[b] are ignored and
        query rows i >= q_len[b] output 0. A row with no valid key outputs 0 (never NaN).
      implementation: None (best available), "xla" (blockwise pure JAX) or "cuda" (fused kernel;
        raises if it cannot serve the call).
      deterministic: the CUDA backward accumulates dq/dbias in a fixed order (slower).
      eps: the l2norm clamp, max(‖x‖, eps).

    Returns:
      [B,T,N,Hv] (or [T,N,Hv]) in the query's dtype.
    """
    c = canonicalize(query, key, value, bias, mask, scale=scale, groups=groups,
                     query_seq_lengths=query_seq_lengths,
                     key_value_seq_lengths=key_value_seq_lengths, implementation=implementation)
    impl = _resolve_implementation(implementation, c)
    q, k = (l2norm(c.q, groups, eps), l2norm(c.k, groups, eps)) if l2norm_qk else (c.q, c.k)
    optional = dict(zip(OPTIONALS, (c.bias, c.mask, c.q_len, c.kv_len)))
    cfg = Config(
        is_causal=bool(is_causal), groups=int(groups), bounded=bool(l2norm_qk),
        implementation=impl, deterministic=bool(deterministic),
        present=tuple(n for n in OPTIONALS if optional[n] is not None),
        bias_full=None if c.bias is None else tuple(d != 1 for d in c.bias.shape),
        mask_full=None if c.mask is None else tuple(d != 1 for d in c.mask.shape),
        need_dbias=c.bias is not None)
    out = attention_core(q, k, c.v, c.scale, c.bias, c.mask, c.q_len, c.kv_len, cfg)
    return out[0] if c.unbatched else out


def _operand_spec(x, batch_axes, head_axes):
    if x is None:
        return None
    shape = x.shape[-4:] if x.ndim >= 4 else (1,) * (4 - x.ndim) + x.shape
    lead = (None,) * (x.ndim - 4) if x.ndim > 4 else ()
    spec = (batch_axes if shape[0] != 1 else None, head_axes if shape[1] != 1 else None, None, None)
    return P(*(lead + spec[4 - min(x.ndim, 4):]))


def sharded_cosine_sim_attention(mesh, *, batch_axes=None, head_axes=None, **options):
    """`cosine_sim_attention` under an explicit `jax.shard_map` over batch and head axes.

    For users of `jax.export` or persistent compilation caches, where `custom_partitioning`
    is a poor fit. q/k/v/bias/mask are sharded [batch_axes, -, head_axes, -] (k/v heads too, so
    the kv head count must be divisible by the head-axes size); sequence and head dims are
    replicated. `options` are cosine_sim_attention's keywords; a per-head `scale` array is
    passed as the `scale` argument of the returned function so it can be sharded by head.

    Returns f(query, key, value, bias=None, mask=None, scale=None, query_seq_lengths=None,
    key_value_seq_lengths=None).
    """
    def call(query, key, value, bias=None, mask=None, scale=None, query_seq_lengths=None,
             key_value_seq_lengths=None):
        qkv_spec = P(batch_axes, None, head_axes, None)
        args = dict(bias=bias, mask=mask, scale=scale, query_seq_lengths=query_seq_lengths,
                    key_value_seq_lengths=key_value_seq_lengths)
        specs = dict(bias=_operand_spec(bias, batch_axes, head_axes),
                     mask=_operand_spec(mask, batch_axes, head_axes),
                     scale=None if scale is None or jax.numpy.ndim(scale) == 0 else P(head_axes),
                     query_seq_lengths=P(batch_axes), key_value_seq_lengths=P(batch_axes))
        names = [n for n, a in args.items() if a is not None]

        def local(q, k, v, *rest):
            kw = dict(options)
            kw.update(zip(names, rest))
            return cosine_sim_attention(q, k, v, **kw)

        in_specs = (qkv_spec, qkv_spec, qkv_spec) + tuple(
            specs[n] if specs[n] is not None else P() for n in names)
        f = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec)
        return f(query, key, value, *(args[n] for n in names))

    return call
