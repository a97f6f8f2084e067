"""Ring attention: sequence (context) parallelism over one or more mesh axes.

Every device of the ring holds a slice of the query rows and a slice of the keys/values. K/V
(with the key-side slice of a per-key mask / bias) travel around the ring with `lax.ppermute`;
each device attends its local queries to the block it currently holds and merges the partial
results with the per-row log-sum-exp. The backward runs on the same ring: dK/dV accumulators (f32,
with a per-key bias's gradient) travel with K/V and arrive back home after the last step, dQ
accumulates locally.

Per-block compute is `_ops._local_fwd` / `_ops._local_bwd`, so the CUDA kernel serves the blocks
on GPU and the blockwise XLA path elsewhere. Each block gets its own static config: a diagonal
block is causal (its T and S are equal, so bottom-right alignment is the plain diagonal),
off-diagonal blocks are fully visible or skipped (never computed).

Layouts (per ring of n devices, global sequence split into chunks):
  contiguous: device d holds rows [d*L, (d+1)*L). Causal blocks above the diagonal are skipped,
    so device d computes d+1 blocks (imbalanced, still no wasted work).
  zigzag:     the sequence is cut into 2n chunks; device d holds chunks d and 2n-1-d. Under
    causal masking every device then does the same work at every step (half a block each).
    Use `to_zigzag` / `from_zigzag` (or `zigzag_positions` for rotary tables) to move between
    the natural order and this layout along the sequence axis.

Semantics are exactly those of `cosine_sim_attention` (key_value_seq_lengths / query_seq_lengths
are global positions in the natural order, in either layout); supported extras: GQA/MQA, key
padding lengths, masks and (differentiable) biases that are per-key ([B|1,N|1,1,S]), per-query
([B|1,N|1,T,1]) or fully broadcast. Not supported with a sharded sequence: a mask or bias with
both a full T and a full S dim (the helper raises; the hook falls back to the all-gather).

Two entry points:
  * `ring_cosine_sim_attention(mesh, seq_axes, ...)`: an explicit `jax.shard_map` helper.
  * `_ops`' custom_partitioning hook: plain `cosine_sim_attention` under `jit` with q/k/v
    sharded on the sequence axis (same mesh axes for q's T and k's S) lowers to `ring_fwd` /
    `ring_bwd` (contiguous layout). Set JCA_RING=0 to get the old all-gather behaviour.
"""

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from . import _ops

_F32 = jnp.float32
LAYOUTS = ("contiguous", "zigzag")


class Ring(NamedTuple):
    """Static description of the ring (hashable)."""
    axes: tuple      # mesh axis names sharding the sequence, major to minor
    size: int        # devices on the ring (product of the axes' sizes)
    layout: str      # "contiguous" | "zigzag"


def enabled():
    """The custom_partitioning hook is on unless JCA_RING=0 (read when the op is compiled)."""
    return os.environ.get("JCA_RING", "1") != "0"


# ------------------------------------------------------------------ layout helpers

def _explicit(mesh):
    return any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))



def _zigzag_order(n):
    order = []
    for d in range(n):
        order += [d, 2 * n - 1 - d]
    return order


def _permute_chunks(x, n, axis, order, name):
    x = jnp.asarray(x)
    axis = axis % x.ndim
    L = x.shape[axis]
    if L % (2 * n):
        raise ValueError(f"{name}: axis {axis} of shape {x.shape} is not divisible by 2n={2 * n}")
    C = L // (2 * n)
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = tuple(getattr(sharding, "spec", ()) or ())
    if axis < len(spec) and spec[axis] is not None and _explicit(sharding.mesh):
        # Explicit mesh, sharded along `axis`: slicing would be ambiguous; gather that axis first.
        spec = spec[:axis] + (None,) + spec[axis + 1:]
        x = jax.sharding.reshard(x, sharding.update(spec=P(*spec)))
    return jnp.concatenate([lax.slice_in_dim(x, c * C, (c + 1) * C, axis=axis) for c in order],
                           axis=axis)


def to_zigzag(x, n, axis=1):
    """Reorders `axis` (length divisible by 2n) from natural order to the zig-zag layout, so that
    sharding that axis over n devices gives device d the chunks d and 2n-1-d. Permuting a
    sharded axis moves data between devices: do it once (e.g. on token ids), not per layer."""
    return _permute_chunks(x, n, axis, _zigzag_order(n), "to_zigzag")


def from_zigzag(x, n, axis=1):
    """Inverse of `to_zigzag`."""
    order = _zigzag_order(n)
    return _permute_chunks(x, n, axis, [order.index(c) for c in range(2 * n)], "from_zigzag")


def zigzag_positions(length, n):
    """int32 [length]: the natural-order position of each slot of the zig-zag layout."""
    return to_zigzag(jnp.arange(length, dtype=jnp.int32), n, axis=0)


# ------------------------------------------------------------------ support checks

def unsupported_reason(cfg, T, S, ring):
    """None if the ring can serve this (global-shape) configuration, else why not."""
    n = ring.size
    if ring.layout not in LAYOUTS:
        return f"unknown layout {ring.layout!r}; expected one of {LAYOUTS}"
    if "bias" in cfg.present and cfg.bias_full[2] and cfg.bias_full[3]:
        return ("a bias with both a full query dim and a full key dim is not supported with a "
                "sequence-sharded (ring) attention; per-key [B|1,N|1,1,S] and per-query "
                "[B|1,N|1,T,1] biases are")
    if "mask" in cfg.present and cfg.mask_full[2] and cfg.mask_full[3]:
        return ("a mask with both a full query dim and a full key dim is not supported with a "
                "sequence-sharded (ring) attention; use key_value_seq_lengths or a key-padding "
                "mask [B,1,1,S]")
    chunks = 2 * n if ring.layout == "zigzag" else n
    if T % chunks or S % chunks:
        return (f"sequence lengths T={T}, S={S} must be divisible by {chunks} "
                f"({ring.layout} layout over {n} devices)")
    if cfg.is_causal and T != S:
        return f"causal ring attention needs T == S (got T={T}, S={S})"
    return None


def _side(cfg, name):
    """Where a mask / bias lives: 'kv' (per key: rotates with K/V), 'q' (per query: split with
    the rows), 'static' (broadcast over both) or None (absent)."""
    if name not in cfg.present:
        return None
    full = cfg.mask_full if name == "mask" else cfg.bias_full
    if full[3]:
        return "kv"
    if full[2]:
        return "q"
    return "static"


# ------------------------------------------------------------------ per-device ring

def _axis(ring):
    return ring.axes if len(ring.axes) > 1 else ring.axes[0]


def _shift(ring, xs):
    """Sends every array of xs to the next device on the ring (d -> d+1)."""
    n = ring.size
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, _axis(ring), perm), xs)


def _seg(length, start, size):
    """How many of positions [start, start+size) lie below `length` (int32 [B])."""
    return jnp.clip(length - start, 0, size).astype(jnp.int32)


class _Ctx:
    """Per-device view: local operands, ring geometry and the per-block compute."""

    def __init__(self, cfg, ring, q, k, scale, opt):
        self.cfg, self.ring = cfg, ring
        self.n = ring.size
        self.zig = ring.layout == "zigzag"
        self.Tl, self.Sl = q.shape[1], k.shape[1]
        self.Cq, self.Ck = self.Tl // 2, self.Sl // 2   # zig-zag chunk sizes
        self.d = lax.axis_index(_axis(ring)) if self.n > 1 else jnp.int32(0)
        self.scale = scale
        got = dict(zip(cfg.present, opt))
        self.side = {name: _side(cfg, name) for name in ("mask", "bias")}
        self.mask, self.bias = got.get("mask"), got.get("bias")
        self.q_len, self.kv_len = got.get("q_len"), got.get("kv_len")

    def rotating(self):
        """The key-side operands that travel with K/V: (mask, bias), None where not per key."""
        return tuple(getattr(self, name) if self.side[name] == "kv" else None
                     for name in ("mask", "bias"))

    # global lengths -> lengths of the local (prefix-shaped) slices
    def local_q_len(self, part):
        if self.q_len is None:
            return None
        n, d = self.n, self.d
        if not self.zig:
            return _seg(self.q_len, d * self.Tl, self.Tl)
        second = _seg(self.q_len, (2 * n - 1 - d) * self.Cq, self.Cq)
        if part == "second":
            return second
        # chunk d precedes chunk 2n-1-d, so the valid rows of the pair form a prefix
        return _seg(self.q_len, d * self.Cq, self.Cq) + second

    def local_kv_len(self, src, part):
        if self.kv_len is None:
            return None
        n = self.n
        if not self.zig:
            return _seg(self.kv_len, src * self.Sl, self.Sl)
        first = _seg(self.kv_len, src * self.Ck, self.Ck)
        if part == "first":
            return first
        return first + _seg(self.kv_len, (2 * n - 1 - src) * self.Ck, self.Ck)

    def block_args(self, src, qpart, kvpart, rotating, causal):
        """(cfg, optional operands) of one block; qpart 'all'|'second', kvpart 'all'|'first'."""
        got = {"q_len": self.local_q_len(qpart), "kv_len": self.local_kv_len(src, kvpart)}
        for name, moving in zip(("mask", "bias"), rotating):
            side, x = self.side[name], getattr(self, name)
            if side == "kv":
                x = moving if kvpart == "all" else moving[..., :self.Ck]
            elif side == "q" and qpart == "second":
                x = x[:, :, self.Cq:]
            got[name] = x
        present = tuple(name for name in _ops.OPTIONALS if got.get(name) is not None)
        cfg = self.cfg._replace(is_causal=causal, present=present)
        return cfg, tuple(got[name] for name in present)

    def q_rows(self, x, qpart, axis=1):
        return x if qpart == "all" else lax.slice_in_dim(x, self.Cq, self.Tl, axis=axis)

    def kv_rows(self, x, kvpart):
        return x if kvpart == "all" else x[:, :self.Ck]


def _pad_rows(x, before, axis, value=0.0):
    if before == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, 0)
    return jnp.pad(x, widths, constant_values=value)


def _pad_tail(x, after, axis=1):
    if after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, after)
    return jnp.pad(x, widths)


def _merge(acc, part):
    """Combines two partial softmax results (out f32 [B,T,N,Hv], lse [B,N,T]); -inf safe."""
    o1, l1 = acc
    o2, l2 = part
    m = jnp.maximum(l1, l2)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    e1, e2 = jnp.exp(l1 - m_safe), jnp.exp(l2 - m_safe)
    total = e1 + e2
    ok = total > 0
    total_safe = jnp.where(ok, total, 1.0)
    lse = jnp.where(ok, m_safe + jnp.log(total_safe), -jnp.inf)
    rows = lambda w: jnp.where(ok, w / total_safe, 0.0).transpose(0, 2, 1)[..., None]
    return o1 * rows(e1) + o2 * rows(e2), lse


def _step_kind(ctx, first):
    """How the blocks of one step look: 'full', 'causal', 'skip_upper' or 'zigzag'."""
    if not ctx.cfg.is_causal:
        return "full"
    if first:
        return "causal"
    return "zigzag" if ctx.zig else "skip_upper"


def ring_fwd(cfg, ring, q, k, v, scale, *opt):
    """Per-device forward on the ring. Returns (out [B,Tl,N,Hv] q.dtype, lse [B,N,Tl] f32)."""
    ctx = _Ctx(cfg, ring, q, k, scale, opt)
    n = ctx.n

    def block(rot, src, qpart, kvpart, causal):
        kb, vb, moving = rot
        bcfg, bopt = ctx.block_args(src, qpart, kvpart, moving, causal)
        out, lse = _ops._local_fwd(bcfg, ctx.q_rows(q, qpart), ctx.kv_rows(kb, kvpart),
                                   ctx.kv_rows(vb, kvpart), scale, *bopt)
        out = out.astype(_F32)
        if qpart == "second":
            out = _pad_rows(out, ctx.Cq, 1)
            lse = _pad_rows(lse, ctx.Cq, 2, -jnp.inf)
        return out, lse

    def step(i, rot, acc, first):
        src = (ctx.d - i) % n
        kind = _step_kind(ctx, first)
        if kind in ("full", "causal"):
            part = block(rot, src, "all", "all", kind == "causal")
            return part if acc is None else _merge(acc, part)
        if kind == "skip_upper":
            return lax.cond(src < ctx.d,
                            lambda: _merge(acc, block(rot, src, "all", "all", False)),
                            lambda: acc)
        part = lax.cond(src < ctx.d,
                        lambda: block(rot, src, "all", "first", False),
                        lambda: block(rot, src, "second", "all", False))
        return _merge(acc, part)

    rot = (k, v, ctx.rotating())
    nxt = _shift(ring, rot) if n > 1 else None       # issued before the local compute
    acc = step(0, rot, None, True)
    if n > 1:
        def body(i, carry):
            rot, acc = carry
            nxt = _shift(ring, rot)                  # step i+1's block, overlaps step i
            return nxt, step(i, rot, acc, False)
        rot, acc = lax.fori_loop(1, n - 1, body, (nxt, acc))
        acc = step(n - 1, rot, acc, False)
    out, lse = acc
    return out.astype(q.dtype), lse


def ring_bwd(cfg, ring, do, q, k, v, out, lse, scale, *opt):
    """Per-device backward on the ring. Returns (dq_acc f32 unscaled, dk, dv[, dbias f32]) like
    `_local_bwd`. dK/dV (and a per-key bias's gradient) travel with their K/V block and arrive
    home after the last step; dQ (and a per-query or broadcast bias's gradient) stay local."""
    ctx = _Ctx(cfg, ring, q, k, scale, opt)
    n = ctx.n
    bias_side = ctx.side["bias"]
    need_db = cfg.need_dbias and bias_side is not None
    db_shape = ctx.bias.shape if need_db else None

    def block(rot, src, qpart, kvpart, causal):
        kb, vb, moving = rot
        bcfg, bopt = ctx.block_args(src, qpart, kvpart, moving, causal)
        rows = functools.partial(ctx.q_rows, qpart=qpart)
        res = _ops._local_bwd(bcfg, rows(do), rows(q), ctx.kv_rows(kb, kvpart),
                              ctx.kv_rows(vb, kvpart), rows(out), rows(lse, axis=2),
                              scale, *bopt)
        dq, dk, dv = (x.astype(_F32) for x in res[:3])
        db = res[3].astype(_F32) if need_db else None
        if qpart == "second":
            dq = _pad_rows(dq, ctx.Cq, 1)
            if bias_side == "q":
                db = _pad_rows(db, ctx.Cq, 2)
        if kvpart == "first":
            dk, dv = _pad_tail(dk, ctx.Sl - ctx.Ck), _pad_tail(dv, ctx.Sl - ctx.Ck)
            if bias_side == "kv":
                db = _pad_tail(db, ctx.Sl - ctx.Ck, axis=3)
        return dq, (dk, dv, db if bias_side == "kv" else None), (db if bias_side != "kv" else None)

    def zeros():
        db = jnp.zeros(db_shape, _F32) if need_db else None
        return (jnp.zeros(q.shape, _F32),
                (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32), db if bias_side == "kv" else None),
                db if bias_side != "kv" else None)

    def step(i, rot, first):
        """(dq part, travelling parts (dk, dv, per-key dbias), local dbias part)."""
        src = (ctx.d - i) % n
        kind = _step_kind(ctx, first)
        if kind in ("full", "causal"):
            return block(rot, src, "all", "all", kind == "causal")
        if kind == "skip_upper":
            return lax.cond(src < ctx.d, lambda: block(rot, src, "all", "all", False), zeros)
        return lax.cond(src < ctx.d,
                        lambda: block(rot, src, "all", "first", False),
                        lambda: block(rot, src, "second", "all", False))

    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    rot = (k, v, ctx.rotating())
    nxt = _shift(ring, rot) if n > 1 else None
    dq, travel, db_local = step(0, rot, True)
    if n > 1:
        travel = _shift(ring, travel)                # dK/dV of block d-i ride with its K/V

        def body(i, carry):
            rot, travel, dq, db_local = carry
            nxt = _shift(ring, rot)
            dq_i, travel_i, db_i = step(i, rot, False)
            travel = _shift(ring, add(travel, travel_i))
            return nxt, travel, dq + dq_i, add(db_local, db_i)

        rot, travel, dq, db_local = lax.fori_loop(1, n - 1, body, (nxt, travel, dq, db_local))
        dq_i, travel_i, db_i = step(n - 1, rot, False)
        travel = _shift(ring, add(travel, travel_i))  # home: block d was at device d-1
        dq, db_local = dq + dq_i, add(db_local, db_i)
    dk, dv, db_kv = travel
    res = (dq, dk.astype(k.dtype), dv.astype(v.dtype))
    if not cfg.need_dbias:
        return res
    if bias_side == "kv":
        db = db_kv
    elif bias_side == "static" and n > 1:   # every device holds a partial sum over its rows
        db = lax.psum(db_local, _axis(ring))
    else:
        db = db_local
    return res + (db,)


# ------------------------------------------------------------------ explicit shard_map helper

_as_tuple = _ops._as_tuple


class _Spec(NamedTuple):
    mesh: object
    ring: Ring
    b: object
    hq: object
    hk: object


def _seq(spec):
    axes = spec.ring.axes
    return axes if len(axes) > 1 else axes[0]


def _specs(cfg, spec):
    """in/out PartitionSpecs for the per-device ring functions."""
    b, hq, hk, s = spec.b, spec.hq, spec.hk, _seq(spec)
    qs, kvs, rows = P(b, s, hq, None), P(b, s, hk, None), P(b, hq, s)
    opt = []
    for name in cfg.present:
        if name in ("mask", "bias"):
            bf, nf, tf, sf = cfg.mask_full if name == "mask" else cfg.bias_full
            opt.append(P(b if bf else None, hq if nf else None, s if tf and not sf else None,
                         s if sf else None))
        else:
            opt.append(P(b))
    return qs, kvs, rows, P(hq), tuple(opt)


def _present(bias, mask, q_len, kv_len):
    return tuple(x for x in (bias, mask, q_len, kv_len) if x is not None)


def _placed(mesh, specs, args):
    """Under an Explicit mesh shard_map wants inputs already in its in_specs: reshard them."""
    if not _explicit(mesh):
        return args
    out = []
    for x, s in zip(args, specs):
        if jax.typeof(x).sharding.spec != s:
            x = jax.sharding.reshard(x, NamedSharding(mesh, s))
        out.append(x)
    return tuple(out)


def _sharded_fwd(cfg, spec, q, k, v, scale, *opt):
    qs, kvs, rows, heads, opt_specs = _specs(cfg, spec)
    in_specs = (qs, kvs, kvs, heads) + opt_specs
    f = jax.shard_map(functools.partial(ring_fwd, cfg, spec.ring), mesh=spec.mesh,
                      in_specs=in_specs, out_specs=(qs, rows), check_vma=False)
    return f(*_placed(spec.mesh, in_specs, (q, k, v, scale) + opt))


def _sharded_bwd(cfg, spec, do, q, k, v, out, lse, scale, *opt):
    qs, kvs, rows, heads, opt_specs = _specs(cfg, spec)
    # Gradients of operands replicated over a sharded axis are partial sums on each device.
    kv_sum = _as_tuple(spec.hq) if spec.hk is None else ()   # MQA with sharded query heads
    out_specs = (qs, kvs, kvs)
    db_sum = ()
    if cfg.need_dbias:
        full = cfg.bias_full
        db_sum = (() if full[0] else _as_tuple(spec.b)) + (() if full[1] else _as_tuple(spec.hq))
        out_specs += (opt_specs[cfg.present.index("bias")],)

    def local(*args):
        res = list(ring_bwd(cfg, spec.ring, *args))
        if kv_sum:
            res[1], res[2] = lax.psum(res[1], kv_sum), lax.psum(res[2], kv_sum)
        if db_sum:
            res[3] = lax.psum(res[3], db_sum)
        return tuple(res)

    in_specs = (qs, qs, kvs, kvs, qs, rows, heads) + opt_specs
    f = jax.shard_map(local, mesh=spec.mesh, in_specs=in_specs, out_specs=out_specs,
                      check_vma=False)
    return f(*_placed(spec.mesh, in_specs, (do, q, k, v, out, lse, scale) + opt))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _ring_core(q, k, v, scale, bias, mask, q_len, kv_len, cfg, spec):
    return _sharded_fwd(cfg, spec, q, k, v, scale, *_present(bias, mask, q_len, kv_len))[0]


def _ring_core_fwd(q, k, v, scale, bias, mask, q_len, kv_len, cfg, spec):
    out, lse = _sharded_fwd(cfg, spec, q, k, v, scale, *_present(bias, mask, q_len, kv_len))
    return out, (q, k, v, scale, bias, mask, q_len, kv_len, out, lse)


def _ring_core_bwd(cfg, spec, res, do):
    q, k, v, scale, bias, mask, q_len, kv_len, out, lse = res
    grads = _sharded_bwd(cfg, spec, do, q, k, v, out, lse, scale,
                         *_present(bias, mask, q_len, kv_len))
    dq_acc, dk, dv = grads[:3]
    scale_f32 = scale.astype(_F32)
    dq = (dq_acc * scale_f32[None, None, :, None]).astype(q.dtype)
    dscale = jnp.sum(q.astype(_F32) * dq_acc, axis=(0, 1, 3)).astype(scale.dtype)
    dbias = None if bias is None else grads[3].astype(bias.dtype)
    return dq, dk, dv, dscale, dbias, None, None, None


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def ring_cosine_sim_attention(mesh, seq_axes, *, batch_axes=None, head_axes=None,
                              layout="contiguous", **options):
    """`cosine_sim_attention` with ring (sequence-parallel) attention over `seq_axes`.

    q/k/v are sharded [batch_axes, seq_axes, head_axes, -]: each device holds a slice of the
    sequence, K/V rotate over the ring with `ppermute`, and no device ever holds the full K/V.
    With layout="zigzag", inputs (and per-key / per-query masks) must already be in zig-zag order
    along the sequence axis (`to_zigzag(x, ring_size)`), and the output is in that order too;
    query_seq_lengths / key_value_seq_lengths still count positions in the natural order. Use it
    with is_causal=True for a balanced load.

    `options` are cosine_sim_attention's keywords (scale, groups, l2norm_qk, is_causal,
    implementation, deterministic, eps). Returns f(query, key, value, bias=None, mask=None,
    scale=None, query_seq_lengths=None, key_value_seq_lengths=None); a `scale` given here
    overrides the one in `options` (it may be a traced / learned [N] array).

    Requirements: the sequence lengths divisible by the ring size (2x ring size for zigzag),
    T == S for causal, and a bias / mask that is per-key [B|1,N|1,1,S], per-query
    [B|1,N|1,T,1] or fully broadcast (not both a full T and a full S dim). In the zig-zag
    layout, per-key and per-query operands must be in zig-zag order along their S / T dim.
    """
    from ._checks import canonicalize
    from .api import _resolve_implementation
    from .normalize import DEFAULT_EPS, l2norm

    if layout not in LAYOUTS:
        raise ValueError(f"ring_cosine_sim_attention: unknown layout {layout!r}; expected one of {LAYOUTS}")
    axes = _as_tuple(seq_axes)
    if not axes:
        raise ValueError("ring_cosine_sim_attention: seq_axes must name at least one mesh axis")
    unknown = [k for k in options if k not in (
        "scale", "groups", "l2norm_qk", "is_causal", "implementation", "deterministic", "eps")]
    if unknown:
        raise TypeError(f"ring_cosine_sim_attention: unexpected options {unknown}")
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    ring = Ring(axes, size, layout)

    def call(query, key, value, bias=None, mask=None, scale=None, query_seq_lengths=None,
             key_value_seq_lengths=None):
        groups = options.get("groups", 1)
        impl_opt = options.get("implementation")
        c = canonicalize(query, key, value, bias, mask,
                         scale=options.get("scale", 10.0) if scale is None else scale,
                         groups=groups, query_seq_lengths=query_seq_lengths,
                         key_value_seq_lengths=key_value_seq_lengths, implementation=impl_opt)
        impl = _resolve_implementation(impl_opt, c)
        eps = options.get("eps", DEFAULT_EPS)
        q, k = c.q, c.k
        if options.get("l2norm_qk", True):
            q, k = l2norm(q, groups, eps), l2norm(k, groups, eps)
        optional = dict(zip(_ops.OPTIONALS, (c.bias, c.mask, c.q_len, c.kv_len)))
        cfg = _ops.Config(
            is_causal=bool(options.get("is_causal", False)), groups=int(groups),
            bounded=bool(options.get("l2norm_qk", True)), implementation=impl,
            deterministic=bool(options.get("deterministic", False)),
            present=tuple(n for n in _ops.OPTIONALS if optional[n] is not None),
            bias_full=None if c.bias is None else tuple(d != 1 for d in c.bias.shape),
            mask_full=None if c.mask is None else tuple(d != 1 for d in c.mask.shape),
            need_dbias=c.bias is not None)
        T, S = q.shape[1], k.shape[1]
        reason = unsupported_reason(cfg, T, S, ring)
        if reason is not None:
            raise ValueError(f"ring_cosine_sim_attention: {reason}")
        N, K = q.shape[2], k.shape[2]
        b, hq, hk = _ops._plan(mesh, NamedSharding(mesh, P(batch_axes, None, head_axes, None)),
                               N, K)
        spec = _Spec(mesh, ring, b, hq, hk)
        out = _ring_core(q, k, c.v, c.scale, c.bias, c.mask, c.q_len, c.kv_len, cfg, spec)
        return out[0] if c.unbatched else out

    return call


# ------------------------------------------------------------------ custom_partitioning hook

def partition_ring(cfg, mesh, q_sharding, k_sharding, T, S):
    """The Ring to use when `_ops`' partitioner sees q's T and k's S sharded over the same mesh
    axes, or None (then the sequence is replicated, as before). Contiguous layout."""
    if not enabled() or not isinstance(q_sharding, NamedSharding) \
            or not isinstance(k_sharding, NamedSharding):
        return None
    tq = _ops._spec(q_sharding, 4)[1]
    sk = _ops._spec(k_sharding, 4)[1]
    axes = _as_tuple(tq)
    if not axes or axes != _as_tuple(sk):
        return None
    ring = Ring(axes, _ops._axes_size(mesh, axes), "contiguous")
    if ring.size <= 1 or unsupported_reason(cfg, T, S, ring) is not None:
        return None
    return ring


def explicit_mesh_ring(plan, cfg, q, k):
    """For `api`'s Explicit-mesh path (q typed with an Explicit sharding): a spec for
    `ring_core` when q's T and k's S are sharded over the same mesh axes and the ring serves
    this configuration, else None (then the sequence is replicated, as before)."""
    if not enabled():
        return None
    mesh, b, hq, hk = plan
    tq = _ops._spec(jax.typeof(q).sharding, 4)[1]
    sk = _ops._spec(jax.typeof(k).sharding, 4)[1]
    axes = _as_tuple(tq)
    if not axes or axes != _as_tuple(sk):
        return None
    ring = Ring(axes, _ops._axes_size(mesh, axes), "contiguous")
    if ring.size <= 1 or unsupported_reason(cfg, q.shape[1], k.shape[1], ring) is not None:
        return None
    return _Spec(mesh, ring, b, hq, hk)


def ring_core(q, k, v, scale, mask, q_len, kv_len, cfg, spec, bias=None):
    """Differentiable ring attention on global (sharded) arrays; spec from `explicit_mesh_ring`."""
    return _ring_core(q, k, v, scale, bias, mask, q_len, kv_len, cfg, spec)
