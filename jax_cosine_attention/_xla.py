"""Blockwise XLA implementation of the core op: O(T + S) extra memory, forward and backward.

Runs everywhere (CPU, TPU, GPU without the extension). Forward: a sequential map over query
blocks, each looping over the key blocks it can see with a running max and running sums.
Backward recomputes the probabilities from the saved log-sum-exp, in two passes that need no
atomics: dK/dV per key block (looping over query blocks), then dQ and dbias per query block.

Internally heads are split as [K, G] (kv head, group member) so grouped-query attention never
copies K or V. The contract (shapes, lse convention, unscaled dq) is the one in `_ops.py`.
"""

import jax
import jax.numpy as jnp
from jax import lax

from ._masking import valid_pairs

# (query block, key block). Tests shrink these to exercise many blocks at small sizes.
BLOCK_SIZES = (512, 512)

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


def _tile(length, block):
    """Block size, block count and padded length for one sequence axis."""
    b = min(block, length) if length else 1
    n = max(1, -(-length // b))
    return b, n, n * b


def _pad_axis(x, axis, to):
    pad = to - x.shape[axis]
    if pad <= 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _slice(x, axis, start, size):
    """Block of x along axis; a broadcast (size-1) axis is returned whole."""
    if x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _heads5(x, K, G, Tp, Sp):
    """[Bb,Nb,Tb,Sb] bias/mask -> [Bb,Kb,Gb,Tb',Sb'] with full T/S dims padded to Tp/Sp."""
    if x is None:
        return None
    Bb, Nb, Tb, Sb = x.shape
    x = x.reshape(Bb, K, G, Tb, Sb) if Nb != 1 else x.reshape(Bb, 1, 1, Tb, Sb)
    if Tb != 1:
        x = _pad_axis(x, 3, Tp)
    if Sb != 1:
        x = _pad_axis(x, 4, Sp)
    return x


class _Layout:
    """Padded, head-split views of the inputs plus the per-block score computation."""

    def __init__(self, q, k, scale, bias, mask, q_len, kv_len, is_causal):
        B, T, N, H = q.shape
        S, K = k.shape[1], k.shape[2]
        self.B, self.T, self.S, self.N, self.K, self.G, self.H = B, T, S, N, K, N // K, H
        self.bq, self.nq, self.Tp = _tile(T, BLOCK_SIZES[0])
        self.bk, self.nk, self.Sp = _tile(S, BLOCK_SIZES[1])
        self.is_causal = is_causal
        self.scale5 = scale.astype(_F32).reshape(1, K, self.G, 1, 1)
        self.bias5 = _heads5(bias, K, self.G, self.Tp, self.Sp)
        self.mask5 = _heads5(mask, K, self.G, self.Tp, self.Sp)
        self.q_len, self.kv_len = q_len, kv_len

    def q_major(self, x):  # [B,T,N,D] -> [B,K,G,Tp,D]
        x = _pad_axis(x, 1, self.Tp)
        return x.reshape(self.B, self.Tp, self.K, self.G, x.shape[-1]).transpose(0, 2, 3, 1, 4)

    def kv_major(self, x):  # [B,S,K,D] -> [B,K,Sp,D]
        return _pad_axis(x, 1, self.Sp).transpose(0, 2, 1, 3)

    def rows(self, x):  # [B,N,T] -> [B,K,G,Tp]
        x = _pad_axis(x, 2, self.Tp)
        return x.reshape(self.B, self.K, self.G, self.Tp)

    # Reshapes below merge one pair of axes at a time: Explicit-mesh sharding rules need that.
    def from_q_blocks(self, blocks):  # [nq,B,K,G,bq,D] -> [B,T,N,D]
        D = blocks.shape[-1]
        x = blocks.transpose(1, 0, 4, 2, 3, 5).reshape(self.B, self.Tp, self.K, self.G, D)
        return x.reshape(self.B, self.Tp, self.N, D)[:, :self.T]

    def from_row_blocks(self, blocks):  # [nq,B,K,G,bq] -> [B,N,T]
        x = blocks.transpose(1, 2, 3, 0, 4).reshape(self.B, self.K, self.G, self.Tp)
        return x.reshape(self.B, self.N, self.Tp)[:, :, :self.T]

    def key_block_end(self, t0):
        """One past the last key block that query rows [t0, t0 + bq) can see."""
        if not self.is_causal:
            return self.nk
        last_row = jnp.minimum(t0 + self.bq, self.T)
        return jnp.clip(-(-(last_row + self.S - self.T) // self.bk), 0, self.nk)

    def query_block_start(self, s0):
        """First query block whose rows can see key s0."""
        if not self.is_causal:
            return 0
        return jnp.clip((s0 - (self.S - self.T)) // self.bq, 0, self.nq)

    def scores(self, qi, kj, t0, s0):
        """Scaled logits (+ bias) [B,K,G,bq,bk] in float32 and their validity."""
        s = jnp.einsum("bkgth,bksh->bkgts", qi, kj, preferred_element_type=_F32, precision=_HIGHEST)
        s = s * self.scale5
        if self.bias5 is not None:
            s = s + _slice(_slice(self.bias5, 3, t0, self.bq), 4, s0, self.bk).astype(_F32)
        mask = None
        if self.mask5 is not None:
            mask = _slice(_slice(self.mask5, 3, t0, self.bq), 4, s0, self.bk)
        ok = valid_pairs(t0 + jnp.arange(self.bq), s0 + jnp.arange(self.bk), T=self.T, S=self.S,
                         is_causal=self.is_causal, q_len=self.q_len, kv_len=self.kv_len, mask=mask,
                         head_axes=2)
        return s, ok


def forward(q, k, v, scale, bias, mask, q_len, kv_len, *, is_causal):
    """Returns out [B,T,N,Hv] (q's dtype) and lse [B,N,T] float32 (-inf for rows with no key)."""
    L = _Layout(q, k, scale, bias, mask, q_len, kv_len, is_causal)
    qT, kT, vT = L.q_major(q), L.kv_major(k), L.kv_major(v)
    Hv = v.shape[-1]

    def q_block(i):
        t0 = i * L.bq
        qi = lax.dynamic_slice_in_dim(qT, t0, L.bq, 3)

        def body(j, carry):
            m, l, acc = carry
            s0 = j * L.bk
            kj = lax.dynamic_slice_in_dim(kT, s0, L.bk, 2)
            vj = lax.dynamic_slice_in_dim(vT, s0, L.bk, 2)
            s, ok = L.scores(qi, kj, t0, s0)
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])
            l = l * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(v.dtype), vj, preferred_element_type=_F32,
                            precision=_HIGHEST)
            return m_new, l, acc * alpha[..., None] + pv

        # Carries derive from the data so they inherit its sharding (explicit meshes).
        zero_rows = jnp.zeros_like(qi[..., 0], _F32)
        init = (zero_rows - jnp.inf, zero_rows, zero_rows[..., None] + jnp.zeros((Hv,), _F32))
        m, l, acc = lax.fori_loop(0, L.key_block_end(t0), body, init)
        has_key = l > 0
        l_safe = jnp.where(has_key, l, 1.0)
        out = jnp.where(has_key[..., None], acc / l_safe[..., None], 0.0)
        lse = jnp.where(has_key, m + jnp.log(l_safe), -jnp.inf)
        return out.astype(q.dtype), lse

    out_blocks, lse_blocks = lax.map(q_block, jnp.arange(L.nq))
    out = L.from_q_blocks(out_blocks)
    lse = L.from_row_blocks(lse_blocks)
    return out, lse


def _reduce_to(x, shape):
    """Sums x over the axes where `shape` has size 1 (the bias's broadcast axes)."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def backward(do, q, k, v, out, lse, scale, bias, mask, q_len, kv_len, *, is_causal, need_dbias):
    """Returns (dq_acc float32 [B,T,N,H] without the scale factor, dk, dv, dbias float32 or None)."""
    L = _Layout(q, k, scale, bias, mask, q_len, kv_len, is_causal)
    qT, kT, vT, doT = L.q_major(q), L.kv_major(k), L.kv_major(v), L.q_major(do)
    delta = L.rows(jnp.einsum("btnh,btnh->bnt", do.astype(_F32), out.astype(_F32)))
    lse_t = L.rows(jnp.where(jnp.isfinite(lse), lse, 0.0))

    def probs(t0, s0, kj, vj):
        qi = lax.dynamic_slice_in_dim(qT, t0, L.bq, 3)
        doi = lax.dynamic_slice_in_dim(doT, t0, L.bq, 3)
        s, ok = L.scores(qi, kj, t0, s0)
        lse_i = lax.dynamic_slice_in_dim(lse_t, t0, L.bq, 3)
        p = jnp.where(ok, jnp.exp(s - lse_i[..., None]), 0.0)
        dp = jnp.einsum("bkgth,bksh->bkgts", doi, vj, preferred_element_type=_F32, precision=_HIGHEST)
        ds = p * (dp - lax.dynamic_slice_in_dim(delta, t0, L.bq, 3)[..., None])
        return qi, doi, p, ds

    def k_block(j):
        s0 = j * L.bk
        kj = lax.dynamic_slice_in_dim(kT, s0, L.bk, 2)
        vj = lax.dynamic_slice_in_dim(vT, s0, L.bk, 2)

        def body(i, carry):
            dk, dv = carry
            qi, doi, p, ds = probs(i * L.bq, s0, kj, vj)
            dv = dv + jnp.einsum("bkgts,bkgth->bksh", p.astype(do.dtype), doi,
                                 preferred_element_type=_F32, precision=_HIGHEST)
            dk = dk + jnp.einsum("bkgts,bkgth->bksh", (ds * L.scale5).astype(q.dtype), qi,
                                 preferred_element_type=_F32, precision=_HIGHEST)
            return dk, dv

        init = (jnp.zeros_like(kj, _F32), jnp.zeros_like(vj, _F32))
        dk, dv = lax.fori_loop(L.query_block_start(s0), L.nq, body, init)
        return dk.astype(k.dtype), dv.astype(v.dtype)

    dk_blocks, dv_blocks = lax.map(k_block, jnp.arange(L.nk))

    def from_k_blocks(blocks):  # [nk,B,K,bk,D] -> [B,S,K,D]
        return blocks.transpose(1, 0, 3, 2, 4).reshape(L.B, L.Sp, L.K, -1)[:, :L.S]

    want_dbias = need_dbias and bias is not None
    if want_dbias:
        b5 = L.bias5.shape
        db_shape = b5[:3] + (L.bq if b5[3] != 1 else 1, b5[4])

    def q_block(i):
        t0 = i * L.bq

        def body(j, carry):
            g, db = carry
            s0 = j * L.bk
            kj = lax.dynamic_slice_in_dim(kT, s0, L.bk, 2)
            vj = lax.dynamic_slice_in_dim(vT, s0, L.bk, 2)
            _, _, _, ds = probs(t0, s0, kj, vj)
            g = g + jnp.einsum("bkgts,bksh->bkgth", ds.astype(k.dtype), kj,
                               preferred_element_type=_F32, precision=_HIGHEST)
            if want_dbias:
                part = _reduce_to(ds, db_shape[:4] + (L.bk if db_shape[4] != 1 else 1,))
                if db_shape[4] == 1:
                    db = db + part
                else:
                    db = lax.dynamic_update_slice_in_dim(db, part, s0, 4)
            return g, db

        g0 = jnp.zeros_like(lax.dynamic_slice_in_dim(qT, t0, L.bq, 3), _F32)
        db0 = jnp.zeros((), _F32)
        if want_dbias:  # reduced like the dS blocks it accumulates, so shardings agree
            db0 = _reduce_to(g0[..., :1], db_shape[:4] + (1,)) + jnp.zeros((db_shape[4],), _F32)
        init = (g0, db0)
        return lax.fori_loop(0, L.key_block_end(t0), body, init)

    g_blocks, db_blocks = lax.map(q_block, jnp.arange(L.nq))
    dq_acc = L.from_q_blocks(g_blocks)
    dbias = None
    if want_dbias:
        Bb, Nb, Tb, Sb = bias.shape
        if Tb == 1:
            db = jnp.sum(db_blocks, axis=0)
        else:
            db = db_blocks.transpose(1, 2, 3, 0, 4, 5).reshape(b5[:3] + (L.Tp, b5[4]))
        dbias = db[..., :Tb, :Sb].reshape(Bb, Nb, Tb, Sb)
    return dq_acc, from_k_blocks(dk_blocks), from_k_blocks(dv_blocks), dbias
