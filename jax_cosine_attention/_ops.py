"""The op stack every implementation plugs into.

    custom_vjp            gradients for q, k, v, scale and bias (recompute in the backward)
      custom_vmap         folds a vmapped axis into the batch axis B
        custom_partitioning   batch x head sharding (Shardy rule), no collectives in the forward
          platform_dependent  cuda=fused FFI kernel (`_cuda`), default=blockwise XLA (`_xla`)

Core contract, shared by `_xla` and `_cuda` (both see per-device arrays):
  forward(q[B,T,N,H], k[B,S,K,H], v[B,S,K,Hv], scale[N] f32, bias?, mask?, q_len?, kv_len?)
      -> out [B,T,N,Hv] in q's dtype, lse [B,N,T] f32 (natural log; -inf where a row has no key)
  backward(do, q, k, v, out, lse, scale, ...)
      -> dq_acc [B,T,N,H] f32 WITHOUT the scale factor, dk, dv, dbias f32 in the bias's shape
  dq = scale * dq_acc and dscale = sum(q * dq_acc) are then formed here, in XLA.

With Config.norm_eps set (the CUDA path where `_cuda.fuses_norm_bwd`: groups 1, no bias or
mask) the op also owns the l2norm of q and k: the custom_vjp takes the raw q, k, normalises
them in its forward (`_l2norm_op.l2norm`), and its backward op takes q_raw, k_raw as two extra
operands and returns (dq, dk, dv, rowdot): dq, dk the gradients of the raw inputs (the kernels
apply the l2norm backward in their epilogues; elsewhere `_finish_norm` does it in XLA) and
rowdot [B,N,T] = sum_h q * dq_acc, whose sum over b and t is dscale.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from . import _cuda, _l2norm_op, _xla

OPTIONALS = ("bias", "mask", "q_len", "kv_len")


class Config(NamedTuple):
    """Static description of one call; hashable, so it keys the cached op builders."""
    is_causal: bool
    groups: int
    bounded: bool            # q, k are l2-normalised: |<q,k>| <= groups
    implementation: str      # "xla" or "cuda" (resolved by the API)
    deterministic: bool
    present: tuple           # which of OPTIONALS are passed, in that order
    bias_full: tuple | None  # per bias dim: True if full size, False if broadcast (size 1)
    mask_full: tuple | None
    need_dbias: bool
    norm_eps: float | None = None  # l2norm of q, k fused into the op (see the module docstring)


def _unpack(cfg, opt):
    got = dict(zip(cfg.present, opt))
    return tuple(got.get(name) for name in OPTIONALS)


def _use_kernel(cfg, q, k, v, bias, mask):
    if cfg.implementation != "cuda":
        return False
    return _cuda.unsupported_reason(q.shape, k.shape, v.shape, q.dtype,
                                    None if bias is None else bias.shape,
                                    None if bias is None else bias.dtype,
                                    None if mask is None else mask.shape) is None


# ---------------------------------------------------------------- per-device compute

def _local_fwd(cfg, q, k, v, scale, *opt):
    bias, mask, q_len, kv_len = _unpack(cfg, opt)
    xla = functools.partial(_xla.forward, is_causal=cfg.is_causal)
    args = (q, k, v, scale, bias, mask, q_len, kv_len)
    if not _use_kernel(cfg, q, k, v, bias, mask):
        return xla(*args)
    cuda = functools.partial(_cuda.fwd, causal=cfg.is_causal, groups=cfg.groups,
                             bounded=cfg.bounded, deterministic=cfg.deterministic)
    return jax.lax.platform_dependent(*args, cuda=cuda, default=xla)


def _local_bwd(cfg, do, q, k, v, out, lse, scale, *opt):
    if cfg.norm_eps is not None:
        return _local_bwd_norm(cfg, do, q, k, v, out, lse, scale, *opt)
    bias, mask, q_len, kv_len = _unpack(cfg, opt)
    xla = functools.partial(_xla.backward, is_causal=cfg.is_causal, need_dbias=cfg.need_dbias)
    args = (do, q, k, v, out, lse, scale, bias, mask, q_len, kv_len)
    if not _use_kernel(cfg, q, k, v, bias, mask):
        res = xla(*args)
    else:
        cuda = functools.partial(_cuda.bwd, causal=cfg.is_causal, groups=cfg.groups,
                                 bounded=cfg.bounded, need_dbias=cfg.need_dbias,
                                 deterministic=cfg.deterministic)
        res = jax.lax.platform_dependent(*args, cuda=cuda, default=xla)
    return tuple(r for r in res if r is not None)


def _finish_norm(eps, res, q, scale, q_raw, k_raw):
    """(dq_acc, dk, dv[, dbias]) of the normalised q, k -> (dq, dk, dv[, dbias], rowdot) of the
    raw ones: the l2norm backward in XLA (where the kernels cannot fuse it)."""
    dq_acc, dk, dv = res[:3]
    rowdot = jnp.einsum("btnh,btnh->bnt", q.astype(jnp.float32), dq_acc)
    dq = _l2norm_op.xla_bwd(q_raw, dq_acc * scale.astype(jnp.float32)[None, None, :, None],
                            groups=1, eps=eps)
    dk = _l2norm_op.xla_bwd(k_raw, dk, groups=1, eps=eps)
    return (dq, dk, dv) + tuple(res[3:]) + (rowdot,)


def _local_bwd_norm(cfg, do, q, k, v, out, lse, scale, *opt):
    """`_local_bwd` with the l2norm backward (cfg.norm_eps; never a bias or mask): opt ends with
    q_raw, k_raw."""
    *opt, q_raw, k_raw = opt
    bias, mask, q_len, kv_len = _unpack(cfg, opt)
    args = (do, q, k, v, out, lse, scale, bias, mask, q_len, kv_len, q_raw, k_raw)

    def xla(do, q, k, v, out, lse, scale, bias, mask, q_len, kv_len, q_raw, k_raw):
        res = _xla.backward(do, q, k, v, out, lse, scale, bias, mask, q_len, kv_len,
                            is_causal=cfg.is_causal, need_dbias=False)
        return _finish_norm(cfg.norm_eps, res[:3], q, scale, q_raw, k_raw)

    if not _use_kernel(cfg, q, k, v, bias, mask):
        return xla(*args)

    def cuda(do, q, k, v, out, lse, scale, bias, mask, q_len, kv_len, q_raw, k_raw):
        res = _cuda.bwd(do, q, k, v, out, lse, scale, bias, mask, q_len, kv_len,
                        causal=cfg.is_causal, groups=1, bounded=cfg.bounded, need_dbias=False,
                        deterministic=cfg.deterministic, q_raw=q_raw, k_raw=k_raw,
                        norm_eps=cfg.norm_eps)
        return tuple(r for r in res if r is not None)

    return jax.lax.platform_dependent(*args, cuda=cuda, default=xla)


# ---------------------------------------------------------------- sharding

def _operand_rule(prefix, full, hq):
    names = (("b", f"{prefix}b1"), (hq, f"{prefix}n1"), ("t", f"{prefix}t1"), ("s", f"{prefix}s1"))
    return " ".join(n[0] if f else n[1] for n, f in zip(names, full))


def _rules(cfg, G, K):
    """Shardy rules for the forward and backward ops: only b and the heads may stay sharded.

    Query heads are the compound factor (k g) of kv heads k and group members g; a factor of
    size 1 may not be part of a compound, hence the special cases.
    """
    hk = "k" if K > 1 else "kone"
    hq = "(k g)" if K > 1 and G > 1 else ("k" if G == 1 else "g")
    opt = []
    for name in cfg.present:
        if name == "bias":
            opt.append(_operand_rule("x", cfg.bias_full, hq))
        elif name == "mask":
            opt.append(_operand_rule("m", cfg.mask_full, hq))
        else:
            opt.append("b")
    qr, kr, vr = f"b t {hq} h", f"b s {hk} h", f"b s {hk} e"
    fwd = ", ".join([qr, kr, vr, hq] + opt) + f" -> b t {hq} e, b {hq} t"
    outs = [qr, kr, vr] + ([opt[cfg.present.index("bias")]] if cfg.need_dbias else [])
    raw = []
    if cfg.norm_eps is not None:  # q_raw, k_raw in; rowdot out
        raw, outs = [qr, kr], outs + [f"b {hq} t"]
    bwd = (", ".join([f"b t {hq} e", qr, kr, vr, f"b t {hq} e", f"b {hq} t", hq] + opt + raw)
           + " -> " + ", ".join(outs))
    sizes = {"g": G} if K > 1 and G > 1 else {}
    return fwd, bwd, sizes


def _spec(sharding, ndim):
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        return spec + (None,) * (ndim - len(spec))
    return (None,) * ndim


def _as_tuple(axes):
    return () if axes is None else (tuple(axes) if isinstance(axes, (tuple, list)) else (axes,))


def _axes_size(mesh, axes):
    size = 1
    for a in _as_tuple(axes):
        size *= mesh.shape[a]
    return size


def _plan(mesh, q_sharding, N, K):
    """(batch axes, q-head axes, kv-head axes) this op keeps; everything else is replicated."""
    return head_plan(mesh, _spec(q_sharding, 4), N, K)


def head_plan(mesh, q_spec, N, K):
    """Batch and head sharding kept from q's spec: kv heads follow the query heads when they
    divide evenly; MQA keeps its one kv head replicated; otherwise heads are replicated."""
    b_axes, _, h_axes, _ = q_spec
    a = _axes_size(mesh, h_axes)
    if h_axes is None or N % a:
        return b_axes, None, None
    if K % a == 0:
        return b_axes, h_axes, h_axes
    if K == 1:  # MQA: every local query head uses the one (replicated) kv head
        return b_axes, h_axes, None
    return b_axes, None, None


def _operand_sharding(mesh, full, b_axes, h_axes, seq=None):
    # Under ring attention (seq set) a per-query operand is split by rows, a per-key one by keys.
    spec = [b_axes if full[0] else None, h_axes if full[1] else None,
            seq if full[2] and not full[3] else None, seq if full[3] else None]
    return NamedSharding(mesh, P(*spec))


def _shardings(cfg, mesh, plan, seq=None):
    b, hq, hk = plan
    ns = lambda *spec: NamedSharding(mesh, P(*spec))
    q, kv, rows, heads = ns(b, seq, hq, None), ns(b, seq, hk, None), ns(b, hq, seq), ns(hq)
    opt = []
    for name in cfg.present:
        if name == "bias":
            opt.append(_operand_sharding(mesh, cfg.bias_full, b, hq, seq))
        elif name == "mask":
            opt.append(_operand_sharding(mesh, cfg.mask_full, b, hq, seq))
        else:
            opt.append(ns(b))
    return q, kv, rows, heads, opt


def _psum(x, axes):
    return jax.lax.psum(x, tuple(axes)) if axes else x


def _meshless(fn):
    """The partitioner traces the per-device body while the user's (possibly Explicit) mesh is
    still set; per-device code must not pick up that mesh's sharding constraints."""
    def run(*args):
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
            return fn(*args)
    return run


def _ring_plan(cfg, mesh, q_info, k_info):
    """Ring attention (`_ring`) when q's T and k's S are sharded over the same mesh axes:
    (per-device fwd, per-device bwd, sequence axes); else the local compute and seq=None."""
    from . import _ring
    ring = _ring.partition_ring(cfg, mesh, q_info.sharding, k_info.sharding,
                                q_info.shape[1], k_info.shape[1])
    if ring is None:
        return functools.partial(_local_fwd, cfg), functools.partial(_local_bwd, cfg), None
    seq = ring.axes if len(ring.axes) > 1 else ring.axes[0]
    return (functools.partial(_ring.ring_fwd, cfg, ring),
            functools.partial(_ring.ring_bwd, cfg, ring), seq)


def _fwd_partition(cfg, mesh, arg_shapes, result_shape):
    N, K = arg_shapes[0].shape[2], arg_shapes[1].shape[2]
    fwd, _, seq = _ring_plan(cfg, mesh, arg_shapes[0], arg_shapes[1])
    q, kv, rows, heads, opt = _shardings(cfg, mesh, _plan(mesh, arg_shapes[0].sharding, N, K), seq)
    return mesh, _meshless(fwd), (q, rows), (q, kv, kv, heads, *opt)


def _bwd_partition(cfg, mesh, arg_shapes, result_shape):
    N, K = arg_shapes[1].shape[2], arg_shapes[2].shape[2]
    plan = _plan(mesh, arg_shapes[1].sharding, N, K)
    b, hq, hk = plan
    norm = cfg.norm_eps is not None
    _, bwd, seq = _ring_plan(cfg._replace(norm_eps=None) if norm else cfg, mesh, arg_shapes[1],
                             arg_shapes[2])
    if norm and seq is not None:  # ring attention, then the l2norm backward on the local rows
        ring_bwd = bwd

        def bwd(do, q, k, v, out, lse, scale, *opt):
            *opt, q_raw, k_raw = opt
            res = ring_bwd(do, q, k, v, out, lse, scale, *opt)
            return _finish_norm(cfg.norm_eps, res, q, scale, q_raw, k_raw)
    elif norm:
        bwd = functools.partial(_local_bwd, cfg)
    q, kv, rows, heads, opt = _shardings(cfg, mesh, plan, seq)
    # Gradients of operands replicated over a sharded axis are partial sums on each device.
    kv_sum = _as_tuple(hq) if hk is None else ()
    dbias_sum = ()
    outs = [q, kv, kv]
    if cfg.need_dbias:
        full = cfg.bias_full
        dbias_sum = (() if full[0] else _as_tuple(b)) + (() if full[1] else _as_tuple(hq))
        outs.append(opt[cfg.present.index("bias")])

    def lower(*args):
        res = list(bwd(*args))
        # (with the l2norm backward fused, dk is linear in the partial dk of the normalised k)
        res[1], res[2] = _psum(res[1], kv_sum), _psum(res[2], kv_sum)
        if cfg.need_dbias:
            res[3] = _psum(res[3], dbias_sum)
        return tuple(res)

    raw = (q, kv) if norm else ()
    if norm:
        outs.append(rows)
    return mesh, _meshless(lower), tuple(outs), (q, q, kv, kv, q, rows, heads, *opt, *raw)


def _fwd_infer(cfg, mesh, arg_shapes, result_shape):
    N, K = arg_shapes[0].shape[2], arg_shapes[1].shape[2]
    seq = _ring_plan(cfg, mesh, arg_shapes[0], arg_shapes[1])[2]
    q, _, rows, _, _ = _shardings(cfg, mesh, _plan(mesh, arg_shapes[0].sharding, N, K), seq)
    return q, rows


def _bwd_infer(cfg, mesh, arg_shapes, result_shape):
    N, K = arg_shapes[1].shape[2], arg_shapes[2].shape[2]
    seq = _ring_plan(cfg, mesh, arg_shapes[1], arg_shapes[2])[2]
    q, kv, rows, _, opt = _shardings(cfg, mesh, _plan(mesh, arg_shapes[1].sharding, N, K), seq)
    outs = [q, kv, kv] + ([opt[cfg.present.index("bias")]] if cfg.need_dbias else [])
    if cfg.norm_eps is not None:
        outs.append(rows)
    return tuple(outs)


@functools.lru_cache(maxsize=None)
def _partitioned(kind, cfg, G, K):
    fwd_rule, bwd_rule, sizes = _rules(cfg, G, K)
    from . import _ring  # the ring hook keeps t, s sharded (JCA_RING=0: replicate, as before)
    replicated = ("h", "e") if _ring.enabled() else ("t", "s", "h", "e")
    if kind == "fwd":
        op = custom_partitioning(functools.partial(_local_fwd, cfg))
        op.def_partition(partition=functools.partial(_fwd_partition, cfg),
                         infer_sharding_from_operands=functools.partial(_fwd_infer, cfg),
                         sharding_rule=fwd_rule,
                         need_replication_factors=_in_rule_order(fwd_rule, replicated), **sizes)
    else:
        op = custom_partitioning(functools.partial(_local_bwd, cfg))
        op.def_partition(partition=functools.partial(_bwd_partition, cfg),
                         infer_sharding_from_operands=functools.partial(_bwd_infer, cfg),
                         sharding_rule=bwd_rule,
                         need_replication_factors=_in_rule_order(bwd_rule, replicated), **sizes)
    return op


def _in_rule_order(rule, factors):
    """Shardy wants special factors listed in order of first appearance in the rule."""
    seen = []
    for token in rule.replace("(", " ").replace(")", " ").replace(",", " ").split():
        if token in factors and token not in seen:
            seen.append(token)
    return tuple(seen)


# ---------------------------------------------------------------- batching

def _fold(x, batched, size):
    """Merges a vmapped leading axis into the batch axis (broadcasting x first if unbatched)."""
    if not batched:
        x = jnp.broadcast_to(x, (size, *x.shape))
    return x.reshape((size * x.shape[1], *x.shape[2:]))


@functools.lru_cache(maxsize=None)
def _batched(kind, cfg, G, K):
    sharded = _partitioned(kind, cfg, G, K)
    names = (("do",) if kind == "bwd" else ()) + ("q", "k", "v") \
        + (("out", "lse") if kind == "bwd" else ()) + ("scale",) + cfg.present \
        + (("q_raw", "k_raw") if kind == "bwd" and cfg.norm_eps is not None else ())

    @jax.custom_batching.custom_vmap
    def op(*arrays):
        return tuple(sharded(*arrays))

    @op.def_vmap
    def rule(axis_size, in_batched, *arrays):
        shared_bias_grad = (kind == "bwd" and cfg.need_dbias and not in_batched[names.index("bias")]
                            and arrays[names.index("bias")].shape[0] == 1)
        if in_batched[names.index("scale")] or shared_bias_grad:
            # A per-example scale cannot fold into B, nor can per-example gradients of a bias
            # shared over the batch: map over the vmapped axis instead.
            xs = tuple(a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                       for a, b in zip(arrays, in_batched))
            outs = jax.lax.map(lambda x: op(*x), xs)
            return outs, (True,) * len(outs)
        B = arrays[names.index("q")].shape[1 if in_batched[names.index("q")] else 0]
        expanded_bias = False
        folded = []
        for name, a, b in zip(names, arrays, in_batched):
            if name == "scale" or (name in ("bias", "mask") and not b and a.shape[0] == 1):
                folded.append(a)  # per head, or shared by every batch element: stays as is
                continue
            if name in ("bias", "mask") and b and a.shape[1] == 1 and B != 1:
                a = jnp.broadcast_to(a, (axis_size, B, *a.shape[2:]))
                expanded_bias |= name == "bias"
            folded.append(_fold(a, b, axis_size))
        inner = cfg._replace(**{f"{n}_full": tuple(d != 1 for d in folded[names.index(n)].shape)
                                for n in ("bias", "mask") if n in names})
        outs = _batched(kind, inner, G, K)(*folded)
        outs = [o.reshape((axis_size, o.shape[0] // axis_size, *o.shape[1:])) for o in outs]
        if kind == "bwd" and cfg.need_dbias and expanded_bias:
            outs[3] = jnp.sum(outs[3], axis=1, keepdims=True)  # back to the bias's shared batch dim
        return tuple(outs), (True,) * len(outs)

    return op


# ---------------------------------------------------------------- differentiation

def attention_core(q, k, v, scale, bias, mask, q_len, kv_len, cfg):
    """Differentiable core: returns out [B,T,N,Hv]. With cfg.norm_eps, q and k are the raw
    inputs, l2-normalised here (groups 1)."""
    return _core(q, k, v, scale, bias, mask, q_len, kv_len, cfg)


def _normalized(q, k, cfg):
    if cfg.norm_eps is None:
        return q, k
    return (_l2norm_op.l2norm(q, 1, cfg.norm_eps), _l2norm_op.l2norm(k, 1, cfg.norm_eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _core(q, k, v, scale, bias, mask, q_len, kv_len, cfg):
    q, k = _normalized(q, k, cfg)
    out, _ = _forward(q, k, v, scale, bias, mask, q_len, kv_len, cfg)
    return out


def _present(bias, mask, q_len, kv_len):
    return tuple(x for x in (bias, mask, q_len, kv_len) if x is not None)


def _forward(q, k, v, scale, bias, mask, q_len, kv_len, cfg):
    K = k.shape[2]
    return _batched("fwd", cfg, q.shape[2] // K, K)(q, k, v, scale,
                                                   *_present(bias, mask, q_len, kv_len))


def _core_fwd(q, k, v, scale, bias, mask, q_len, kv_len, cfg):
    # symbolic_zeros: each argument arrives as CustomVJPPrimal(value, perturbed). A bias nobody
    # differentiates (ALiBi, a fixed relative-position table) then skips the dbias work.
    bias_grad = bias is not None and bias.perturbed
    q_raw, k_raw, v, scale, bias, mask, q_len, kv_len = custom_vjp_primal_tree_values(
        (q, k, v, scale, bias, mask, q_len, kv_len))
    q, k = _normalized(q_raw, k_raw, cfg)
    out, lse = _forward(q, k, v, scale, bias, mask, q_len, kv_len, cfg)
    dbias_marker = () if bias_grad else None  # static, carried as the residuals' structure
    raw = (q_raw, k_raw) if cfg.norm_eps is not None else None
    return out, (q, k, v, scale, bias, mask, q_len, kv_len, out, lse, dbias_marker, raw)


def _like(x, like):
    """Cotangent x with like's dtype and (Explicit-mesh) sharding, as custom_vjp requires."""
    x = x.astype(like.dtype)
    want = jax.typeof(like).sharding
    if jax.typeof(x).sharding.spec != want.spec:  # (Auto meshes may differ in the mesh only)
        x = jax.sharding.reshard(x, want.spec)
    return x


def _core_bwd(cfg, res, do):
    q, k, v, scale, bias, mask, q_len, kv_len, out, lse, dbias_marker, raw = res
    cfg = cfg._replace(need_dbias=dbias_marker is not None)
    if isinstance(do, SymbolicZero):
        do = jnp.zeros(out.shape, out.dtype)
    K = k.shape[2]
    grads = _batched("bwd", cfg, q.shape[2] // K, K)(do, q, k, v, out, lse, scale,
                                                     *_present(bias, mask, q_len, kv_len),
                                                     *(raw or ()))
    dbias = _like(grads[3], bias) if cfg.need_dbias else None
    if raw is not None:  # gradients of the raw q, k; rowdot [B,N,T] -> dscale
        q_raw, k_raw = raw
        dq, dk, dv, rowdot = grads
        dscale = _like(jnp.sum(rowdot, axis=(0, 2)), scale)
        return _like(dq, q_raw), _like(dk, k_raw), _like(dv, v), dscale, None, None, None, None
    dq_acc, dk, dv = grads[:3]
    scale_f32 = scale.astype(jnp.float32)
    dq = _like(dq_acc * scale_f32[None, None, :, None], q)
    dscale = _like(jnp.sum(q.astype(jnp.float32) * dq_acc, axis=(0, 1, 3)), scale)
    return dq, _like(dk, k), _like(dv, v), dscale, dbias, None, None, None


_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)
