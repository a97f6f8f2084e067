"""Public entry points: `cosine_sim_attention` and its `shard_map` wrapper."""

import functools

import jax
from jax.sharding import AxisType, PartitionSpec as P

from . import _cuda, _l2norm_op, _ops, _ring
from ._checks import canonicalize
from ._ops import Config, OPTIONALS, attention_core
from .normalize import DEFAULT_EPS, l2norm


def _resolve_implementation(implementation, c):
    """'xla' or 'cuda'. Raises for an explicit 'cuda' the kernel cannot serve."""
    if implementation == "xla":
        return "xla"
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
    return _attention(query, key, value, bias, mask, scale=scale, groups=groups,
                      l2norm_qk=l2norm_qk, is_causal=is_causal,
                      query_seq_lengths=query_seq_lengths,
                      key_value_seq_lengths=key_value_seq_lengths, implementation=implementation,
                      deterministic=deterministic, eps=eps)


def _attention(query, key, value, bias, mask, *, scale, groups, l2norm_qk, is_causal,
               query_seq_lengths, key_value_seq_lengths, implementation, deterministic, eps,
               mesh=None, batch_axes=None, head_axes=None):
    c = canonicalize(query, key, value, bias, mask, scale=scale, groups=groups,
                     query_seq_lengths=query_seq_lengths,
                     key_value_seq_lengths=key_value_seq_lengths, implementation=implementation)
    impl = _resolve_implementation(implementation, c)
    optional = dict(zip(OPTIONALS, (c.bias, c.mask, c.q_len, c.kv_len)))
    cfg = Config(
        is_causal=bool(is_causal), groups=int(groups), bounded=bool(l2norm_qk),
        implementation=impl, deterministic=bool(deterministic),
        present=tuple(n for n in OPTIONALS if optional[n] is not None),
        bias_full=None if c.bias is None else tuple(d != 1 for d in c.bias.shape),
        mask_full=None if c.mask is None else tuple(d != 1 for d in c.mask.shape),
        need_dbias=c.bias is not None)
    if mesh is not None:
        plan = (mesh,) + _ops.head_plan(mesh, (batch_axes, None, head_axes, None), c.q.shape[2],
                                        c.k.shape[2])
    else:
        plan = _explicit_mesh_plan(c)
    if plan is None and _fuses_norm(c, impl, groups, l2norm_qk):
        # The op normalises q, k itself and its kernels apply the l2norm backward.
        cfg = cfg._replace(norm_eps=float(eps))
        out = attention_core(c.q, c.k, c.v, c.scale, None, None, c.q_len, c.kv_len, cfg)
        return out[0] if c.unbatched else out
    q, k = _normalize_qk(c, impl, groups, eps, l2norm_qk, plan if mesh is not None else None)
    ring = None
    if plan is not None and mesh is None:  # Explicit mesh, sequence sharded: ring attention
        ring = _ring.explicit_mesh_ring(plan, cfg, q, k)
    if plan is None:
        out = attention_core(q, k, c.v, c.scale, c.bias, c.mask, c.q_len, c.kv_len, cfg)
    elif ring is not None:
        out = _ring.ring_core(q, k, c.v, c.scale, c.mask, c.q_len, c.kv_len, cfg, ring,
                              bias=c.bias)
    else:
        out = _under_shard_map(plan, cfg, q, k, c)
    return out[0] if c.unbatched else out


def _fuses_norm(c, impl, groups, l2norm_qk):
    """Whether the l2norm of q and k goes inside the op with its backward fused into the kernels'
    epilogues (`_cuda.fuses_norm_bwd`): the CUDA path, groups 1, no bias or mask, the fused
    l2norm kernels on (JCA_FUSED_L2NORM)."""
    return (impl == "cuda" and l2norm_qk and groups == 1 and c.bias is None and c.mask is None
            and _l2norm_op.enabled() and _cuda.fuses_norm_bwd(c.q.shape[-1], c.q.dtype))


def _normalize_qk(c, impl, groups, eps, l2norm_qk, shard_plan):
    """l2norm of q and k: on the CUDA path by the fused l2norm kernels (one pass forward, one
    backward; `_l2norm_op.l2norm` falls back to `l2norm` where the kernel does not serve the
    dtype/head dim; JCA_FUSED_L2NORM=0 keeps XLA's). `shard_plan`
    (sharded_cosine_sim_attention): run it under the same shard_map as the attention, where its
    custom_partitioning inlines (jax.export-friendly)."""
    if not l2norm_qk:
        return c.q, c.k
    if impl != "cuda" or not _l2norm_op.enabled():
        return l2norm(c.q, groups, eps), l2norm(c.k, groups, eps)
    norm = functools.partial(_l2norm_op.l2norm, groups=groups, eps=eps)
    if shard_plan is None:
        return norm(c.q), norm(c.k)
    mesh, b, hq, hk = shard_plan
    out = []
    for x, spec in ((c.q, P(b, None, hq, None)), (c.k, P(b, None, hk, None))):
        if AxisType.Explicit in tuple(mesh.axis_types):
            x = jax.sharding.reshard(x, spec)
        out.append(jax.shard_map(norm, mesh=mesh, in_specs=spec, out_specs=spec)(x))
    return tuple(out)


def _explicit_mesh_plan(c):
    """(mesh, batch axes, q-head axes, kv-head axes) when q is sharded on an Explicit mesh.

    Explicit meshes type every intermediate with a sharding, which the per-device compute
    should not see: such calls run under `shard_map` over the batch and head axes instead of
    `custom_partitioning`. Other dims are resharded to replicated first.
    """
    sharding = jax.typeof(c.q).sharding
    mesh = sharding.mesh
    if mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    if c.unbatched or all(s is None for s in spec):
        return None
    b, hq, hk = _ops.head_plan(mesh, spec, c.q.shape[2], c.k.shape[2])
    return mesh, b, hq, hk


def _under_shard_map(plan, cfg, q, k, c):
    mesh, b, hq, hk = plan
    q_spec, kv_spec = P(b, None, hq, None), P(b, None, hk, None)
    operands = dict(bias=c.bias, mask=c.mask, q_len=c.q_len, kv_len=c.kv_len)
    present = [n for n in OPTIONALS if operands[n] is not None]
    specs = dict(bias=cfg.bias_full, mask=cfg.mask_full)
    opt_specs = [P(b if specs[n][0] else None, hq if specs[n][1] else None, None, None)
                 if n in specs else P(b) for n in present]
    in_specs = (q_spec, kv_spec, kv_spec, P(hq)) + tuple(opt_specs)
    args = (q, k, c.v, c.scale) + tuple(operands[n] for n in present)
    if AxisType.Explicit in tuple(mesh.axis_types):  # shard_map then wants inputs as specified
        args = tuple(jax.sharding.reshard(a, spec) for a, spec in zip(args, in_specs))

    def local(q, k, v, scale, *rest):
        got = dict(zip(present, rest))
        return attention_core(q, k, v, scale, *(got.get(n) for n in OPTIONALS), cfg)

    # check_vma=False: shard_map's transpose then sums the gradients of operands replicated
    # over a mesh axis (scale, a shared bias, MQA's kv head) across that axis.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                         check_vma=False)(*args)


def sharded_cosine_sim_attention(mesh, *, batch_axes=None, head_axes=None, **options):
    """`cosine_sim_attention` under an explicit `jax.shard_map` over batch and head axes.

    For users of `jax.export` or persistent compilation caches, where `custom_partitioning`
    is a poor fit. q/k/v/bias/mask are split over `batch_axes` and `head_axes` (kv heads too
    when they divide evenly, MQA keeps its kv head replicated); sequence and head dims are
    replicated. `options` are cosine_sim_attention's keywords. Returns
    f(query, key, value, bias=None, mask=None, *, scale=..., query_seq_lengths=...,
    key_value_seq_lengths=...) where a per-head `scale` array is split by head.
    """
    defaults = dict(scale=10.0, groups=1, l2norm_qk=True, is_causal=False,
                    query_seq_lengths=None, key_value_seq_lengths=None, implementation=None,
                    deterministic=False, eps=DEFAULT_EPS)
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"sharded_cosine_sim_attention: unknown options {sorted(unknown)}")

    def call(query, key, value, bias=None, mask=None, **kwargs):
        kw = defaults | options | kwargs
        return _attention(query, key, value, bias, mask, **kw, mesh=mesh, batch_axes=batch_axes,
                          head_axes=head_axes)

    return call
