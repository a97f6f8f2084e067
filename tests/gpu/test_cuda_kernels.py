"""Fused CUDA kernels against a float64 oracle (direct `_cuda.fwd/bwd` calls and the public op).

Run from OUTSIDE the repo root so the installed package (with the .so) is imported.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cosine_attention import _cuda

HEAD_DIMS = (16, 32, 64, 96, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


# ---------------------------------------------------------------- oracle (float64, numpy)

def _valid(B, N, T, S, mask, q_len, kv_len, causal):
    t = np.arange(T)[:, None]
    s = np.arange(S)[None, :]
    ok = np.ones((B, N, T, S), bool)
    if causal:
        ok &= (s <= t + S - T)[None, None]
    if q_len is not None:
        ok &= (np.arange(T)[None, :] < np.asarray(q_len)[:, None])[:, None, :, None]
    if kv_len is not None:
        ok &= (np.arange(S)[None, :] < np.asarray(kv_len)[:, None])[:, None, None, :]
    if mask is not None:
        ok &= np.asarray(mask)
    return ok


def oracle(q, k, v, scale, bias=None, mask=None, q_len=None, kv_len=None, causal=False, do=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    sc = np.asarray(scale, np.float64)
    logits = np.einsum("btnh,bsnh->bnts", q, kk) * sc[None, :, None, None]
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    ok = _valid(B, N, T, S, mask, q_len, kv_len, causal)
    any_ok = ok.any(-1)
    m = np.where(ok, logits, -np.inf).max(-1)
    m = np.where(any_ok, m, 0.0)
    e = np.where(ok, np.exp(logits - m[..., None]), 0.0)
    l = e.sum(-1)
    P = np.where(any_ok[..., None], e / np.where(l > 0, l, 1)[..., None], 0.0)
    lse = np.where(any_ok, m + np.log(np.where(l > 0, l, 1)), -np.inf)
    o = np.einsum("bnts,bsnh->btnh", P, vv)
    if do is None:
        return o, lse
    do = np.asarray(do, np.float64)
    dP = np.einsum("btnh,bsnh->bnts", do, vv)
    Dd = np.einsum("btnh,btnh->bnt", do, o)
    dS = P * (dP - Dd[..., None])
    dq_acc = np.einsum("bnts,bsnh->btnh", dS, kk)
    dk = np.einsum("bnts,btnh->bsnh", dS * sc[None, :, None, None], q)
    dv = np.einsum("bnts,btnh->bsnh", P, do)
    dk = dk.reshape(B, S, K, G, H).sum(3)
    dv = dv.reshape(B, S, K, G, H).sum(3)
    dbias = None
    if bias is not None:
        axes = tuple(i for i, d in enumerate(np.shape(bias)) if d == 1 and dS.shape[i] != 1)
        dbias = dS.sum(axis=axes, keepdims=True)
    return o, lse, dq_acc, dk, dv, dbias


def relerr(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert not np.isnan(x).any(), "NaN in kernel output (unwritten element or bad arithmetic)"
    den = np.linalg.norm(ref)
    return np.linalg.norm(x - ref) / (den if den > 0 else 1.0)


def l2n(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def make(rng, B, T, S, N, K, H, dtype, normalize=True):
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, H)).astype(np.float32)
    if normalize:
        q, k = l2n(q), l2n(k)
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    return q, k, v


def run_kernel(q, k, v, scale, bias=None, mask=None, q_len=None, kv_len=None, *, causal=False,
               bounded=True, groups=1, do=None, need_dbias=None, deterministic=False,
               fused_dq=None):
    scale = jnp.asarray(scale, jnp.float32)

    @jax.jit
    def f(q, k, v, scale, bias, mask, q_len, kv_len, do):
        o, lse = _cuda.fwd(q, k, v, scale, bias, mask, q_len, kv_len, causal=causal,
                           groups=groups, bounded=bounded)
        if do is None:
            return o, lse
        nd = bias is not None if need_dbias is None else need_dbias
        g = _cuda.bwd(do, q, k, v, o, lse, scale, bias, mask, q_len, kv_len, causal=causal,
                      groups=groups, bounded=bounded, need_dbias=nd, deterministic=deterministic,
                      fused_dq=fused_dq)
        return (o, lse) + tuple(g)

    return f(q, k, v, scale, bias, mask, q_len, kv_len, do)


def check_all(res, ref, dtype, with_grads=True):
    tol = TOL[dtype]
    o, lse = res[:2]
    assert relerr(o, ref[0]) < tol, f"o relerr {relerr(o, ref[0])}"
    lse, rlse = np.asarray(lse), ref[1]
    assert np.array_equal(np.isneginf(lse), np.isneginf(rlse)), "lse -inf pattern differs"
    fin = np.isfinite(rlse)
    if fin.any():
        assert np.max(np.abs(lse[fin] - rlse[fin])) < 0.05 + 0.01 * np.max(np.abs(rlse[fin]))
    if not with_grads:
        return
    names = ("dq_acc", "dk", "dv")
    for name, x, r in zip(names, res[2:5], ref[2:5]):
        assert relerr(x, r) < 2 * tol, f"{name} relerr {relerr(x, r)}"
    if ref[5] is not None:
        assert res[5].shape == ref[5].shape
        assert relerr(res[5], ref[5]) < 2 * tol, f"dbias relerr {relerr(res[5], ref[5])}"


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("H", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("causal,T,S", [(False, 100, 130), (True, 130, 100), (True, 77, 200)])
def test_fwd_bwd_dims(H, dtype, causal, T, S):
    rng = np.random.default_rng()
    B, N, K = 2, 4, 2
    q, k, v = make(rng, B, T, S, N, K, H, dtype)
    scale = np.array([10.0, 5.0, 8.0, 10.0], np.float32)
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    res = run_kernel(q, k, v, scale, causal=causal, do=do)
    ref = oracle(q, k, v, scale, causal=causal, do=do)
    check_all(res, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("bshape", ["1NTS", "B1TS", "BNTS", "11TS", "B11S", "1N1S"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bias_and_dbias(dtype, bshape, deterministic):
    rng = np.random.default_rng()
    B, T, S, N, K, H = 2, 70, 90, 4, 1, 64
    q, k, v = make(rng, B, T, S, N, K, H, dtype)
    full = dict(B=B, N=N, T=T, S=S)
    shp = tuple(1 if ch == "1" else full[ch] for ch in bshape)
    bias = jnp.asarray(rng.standard_normal(shp) * 3, jnp.float32)
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    res = run_kernel(q, k, v, 10.0 * np.ones(N, np.float32), bias=bias, causal=True, do=do,
                     deterministic=deterministic)
    ref = oracle(q, k, v, 10.0 * np.ones(N), bias=bias, causal=True, do=do)
    check_all(res, ref, dtype)
    if deterministic:  # dq/dk/dv always; dbias unless reduced over T or S (atomics there)
        res2 = run_kernel(q, k, v, 10.0 * np.ones(N, np.float32), bias=bias, causal=True, do=do,
                          deterministic=True)
        n_out = 5 if "1" in bshape[2:] else 6  # o, lse, dq_acc, dk, dv [, dbias]
        for a, b in zip(res[:n_out], res2[:n_out]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bias_mask_d128(dtype, deterministic):
    """The general (bias / mask) kernels at the largest head dim: a bias broadcast over heads
    (reduced dbias), a dense mask with empty rows, GQA, causal with T != S."""
    rng = np.random.default_rng()
    B, T, S, N, K, H = 2, 90, 150, 4, 2, 128
    q, k, v = make(rng, B, T, S, N, K, H, dtype)
    bias = jnp.asarray(rng.standard_normal((B, 1, T, S)) * 3, jnp.float32)
    mask = rng.random((B, N, T, S)) > 0.3
    mask[1, 2, :7, :] = False
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    sc = np.array([10.0, 6.0, 12.0, 9.0], np.float32)
    res = run_kernel(q, k, v, sc, bias=bias, mask=jnp.asarray(mask), causal=True, do=do,
                     deterministic=deterministic)
    ref = oracle(q, k, v, sc, bias=bias, mask=mask, causal=True, do=do)
    check_all(res, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("mag", [1e4, -1e4])
def test_huge_bias(dtype, mag):
    """Any bias magnitude: an all-very-negative (or very positive) row must stay exact."""
    rng = np.random.default_rng()
    B, T, S, N, H = 1, 40, 50, 2, 32
    q, k, v = make(rng, B, T, S, N, N, H, dtype)
    bias = rng.standard_normal((B, N, T, S)).astype(np.float32)
    bias[:, :, ::3, :] += mag  # whole rows shifted by +-1e4
    bias = jnp.asarray(bias)
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    res = run_kernel(q, k, v, np.full(N, 10.0, np.float32), bias=bias, do=do)
    ref = oracle(q, k, v, np.full(N, 10.0), bias=bias, do=do)
    check_all(res, ref, dtype)


@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_masks_lengths_empty_rows(dtype, H):
    """Masks and lengths, with rows and whole batches that attend nothing; without a mask (lengths
    only), D=128 runs the one-kernel backward (dkdv_dq_kernel)."""
    rng = np.random.default_rng()
    B, T, S, N, K = 3, 96, 80, 4, 2
    q, k, v = make(rng, B, T, S, N, K, H, dtype)
    kpm = rng.random((B, 1, 1, S)) > 0.3
    kpm[1, :, :, :] = False  # batch 1: every key padded -> all rows empty
    dense = rng.random((B, N, T, S)) > 0.5
    dense[0, 0, :5, :] = False  # a few empty rows
    q_len = np.array([T, 50, 7], np.int32)
    kv_len = np.array([S, 60, 0], np.int32)  # batch 2: no keys at all
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    sc = np.full(N, 10.0, np.float32)
    for mask, causal in ((kpm, False), (dense, True), (kpm, True), (None, True)):
        res = run_kernel(q, k, v, sc, mask=None if mask is None else jnp.asarray(mask),
                         q_len=jnp.asarray(q_len),
                         kv_len=jnp.asarray(kv_len), causal=causal, do=do)
        ref = oracle(q, k, v, sc, mask=mask, q_len=q_len, kv_len=kv_len, causal=causal, do=do)
        check_all(res, ref, dtype)
        empty = np.isneginf(ref[1])  # [B,N,T]
        o = np.asarray(res[0], np.float32).transpose(0, 2, 1, 3)
        assert np.all(o[empty] == 0), "rows with no valid key must be exactly 0"
        dq = np.asarray(res[2]).transpose(0, 2, 1, 3)
        assert np.all(dq[empty] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_all_negative_cosines(dtype):
    """Rows whose cosines are all near -1 (the seed's f16 kernel returned zeros here)."""
    rng = np.random.default_rng()
    B, T, S, N, H = 1, 64, 64, 2, 64
    base = l2n(rng.standard_normal((H,)))
    k = l2n(base + 0.05 * rng.standard_normal((B, S, N, H)))
    q = l2n(-base + 0.05 * rng.standard_normal((B, T, N, H)))
    v = rng.standard_normal((B, S, N, H))
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    sc = np.array([10.0, 9.0], np.float32)
    res = run_kernel(q, k, v, sc, do=do)
    ref = oracle(q, k, v, sc, do=do)
    check_all(res, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("bounded,groups,scale", [(False, 1, 1.0), (True, 4, 10.0),
                                                   (True, 1, 30.0), (True, 1, -10.0)])
def test_online_paths(dtype, bounded, groups, scale):
    """Unbounded inputs, grouped l2norm (wide bound), large and negative scales: online-max path
    (or the fixed shift where it is safe)."""
    rng = np.random.default_rng()
    B, T, S, N, H = 2, 50, 120, 2, 64
    q, k, v = make(rng, B, T, S, N, N, H, dtype, normalize=False)
    if bounded:
        qn = np.asarray(q, np.float32).reshape(B, T, N, groups, H // groups)
        kn = np.asarray(k, np.float32).reshape(B, S, N, groups, H // groups)
        q = jnp.asarray(l2n(qn).reshape(B, T, N, H), dtype)
        k = jnp.asarray(l2n(kn).reshape(B, S, N, H), dtype)
    sc = np.full(N, scale, np.float32)
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    res = run_kernel(q, k, v, sc, causal=True, bounded=bounded, groups=groups, do=do)
    ref = oracle(q, k, v, sc, causal=True, do=do)
    check_all(res, ref, dtype)


@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences(H, causal):
    """T, S up to 8192 against a float32 jnp oracle on the GPU (f64 would be too slow)."""
    rng = np.random.default_rng()
    dtype = jnp.bfloat16
    B, N, K = 1, 2, 1
    T, S = (8192, 8192) if not causal else (4096, 8192)
    q, k, v = make(rng, B, T, S, N, K, H, dtype)
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    sc = jnp.full((N,), 10.0, jnp.float32)
    res = run_kernel(q, k, v, sc, causal=causal, do=do)

    def ref_fn(q, k, v, do):
        qf, kf, vf, dof = (x.astype(jnp.float32) for x in (q, k, v, do))
        kf, vf = jnp.repeat(kf, N // K, 2), jnp.repeat(vf, N // K, 2)

        def attn(qf, kf, vf):
            s = jnp.einsum("btnh,bsnh->bnts", qf, kf, precision="highest") * sc[:, None, None]
            if causal:
                s = jnp.where(jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + S - T, s, -jnp.inf)
            p = jax.nn.softmax(s, -1)
            return jnp.einsum("bnts,bsnh->btnh", p, vf, precision="highest")

        o, vjp = jax.vjp(attn, qf, kf, vf)
        return o, vjp(dof)

    o_ref, (dq_ref, dk_ref, dv_ref) = jax.jit(ref_fn)(q, k, v, do)
    assert relerr(res[0], o_ref) < 2e-2
    dq = np.asarray(res[2]) * 10.0
    assert relerr(dq, dq_ref) < 4e-2
    dk_ref = np.asarray(dk_ref).reshape(B, S, K, N // K, H).sum(3)
    dv_ref = np.asarray(dv_ref).reshape(B, S, K, N // K, H).sum(3)
    assert relerr(res[3], dk_ref) < 4e-2
    assert relerr(res[4], dv_ref) < 4e-2


def test_scan_and_vmap():
    """Repeated calls inside lax.scan (command-buffer friendly) and vmap (sequential fallback)."""
    rng = np.random.default_rng()
    B, T, S, N, H = 1, 64, 64, 2, 64
    q, k, v = make(rng, B, T, S, N, N, H, jnp.bfloat16)
    sc = jnp.full((N,), 10.0, jnp.float32)

    def body(c, _):
        o, _ = _cuda.fwd(c, k, v, sc, None, None, None, None, causal=False, groups=1,
                         bounded=True)
        return jnp.asarray(l2n_j(o), c.dtype), None

    out, _ = jax.jit(lambda q: jax.lax.scan(body, q, None, length=20))(q)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    qs = jnp.stack([q, q])
    o = jax.jit(jax.vmap(lambda q: _cuda.fwd(q, k, v, sc, None, None, None, None, causal=False,
                                             groups=1, bounded=True)[0]))(qs)
    ref = oracle(q, k, v, np.asarray(sc))[0]
    assert relerr(o[1], ref) < 2e-2


def l2n_j(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def test_workspace_size_matches_extension():
    assert _cuda._C.bwd_workspace_bytes(3, 5, 7) == _cuda.bwd_workspace_bytes(3, 5, 7)


def test_bad_input_clean_error():
    """A shape the handler rejects must raise a clean error, not crash."""
    q = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    k = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    with pytest.raises(Exception, match="scale"):
        jax.block_until_ready(_cuda.fwd(q, k, k, jnp.ones((3,)), None, None, None, None,
                                        causal=False, groups=1, bounded=True))


# ---------------------------------------------------------------- through the public op

def _public():
    import jax_cosine_attention as jca
    if not hasattr(jca, "cosine_sim_attention"):
        pytest.skip("public op not available")
    return jca


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("case", ["plain", "gqa_bias_mask", "lengths_causal"])
def test_public_op_cuda_vs_xla(dtype, case):
    jca = _public()
    rng = np.random.default_rng()
    B, T, S, N, K, H = 2, 80, 96, 4, 2, 64
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    kw = dict(scale=jnp.asarray([10.0, 8.0, 12.0, 10.0]))
    args = ()
    if case == "gqa_bias_mask":
        args = (jnp.asarray(rng.standard_normal((N, T, S)), jnp.float32),
                jnp.asarray(rng.random((B, 1, 1, S)) > 0.2))
    if case == "lengths_causal":
        kw.update(is_causal=True, query_seq_lengths=jnp.asarray([T, 33], jnp.int32),
                  key_value_seq_lengths=jnp.asarray([S, 40], jnp.int32))

    def loss(impl, q, k, v, *args):
        o = jca.cosine_sim_attention(q, k, v, *args, implementation=impl, **kw)
        return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(H, dtype=jnp.float32))), o

    grads = {}
    for impl in ("cuda", "xla"):
        argnums = (0, 1, 2, 3) if args else (0, 1, 2)  # not the bool mask
        f = jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a), argnums=argnums, has_aux=True))
        (_, o), g = f(q, k, v, *args)
        grads[impl] = (o,) + tuple(g)
    tol = 3 * TOL[dtype]
    for i, (a, b) in enumerate(zip(grads["cuda"], grads["xla"])):
        assert relerr(a, b) < tol, f"output {i}: relerr {relerr(a, b)}"


# ---------------------------------------------------------------- sm_90a kernels vs sm_80 kernels

def _run_both(q, k, v, sc, do, **kw):
    """Forward + backward through the sm_90a kernels (where they apply: the opt-in fused-dQ
    backward, then the default two-kernel one) and the sm_80 kernels."""
    outs = []
    for sm90, fused in ((True, True), (True, False), (False, False)):
        def f(q, k, v, sc, ql, kl, do, sm90=sm90, fused=fused):
            opts = dict(causal=kw["causal"], groups=kw.get("groups", 1),
                        bounded=kw.get("bounded", True), sm90=sm90)
            o, lse = _cuda.fwd(q, k, v, sc, None, None, ql, kl, **opts)
            g = _cuda.bwd(do, q, k, v, o, lse, sc, None, None, ql, kl, need_dbias=False,
                          deterministic=False, fused_dq=fused, **opts)
            return (o, lse) + tuple(g)
        outs.append(jax.jit(f)(q, k, v, jnp.asarray(sc, jnp.float32), kw.get("q_len"),
                               kw.get("kv_len"), do))
    return outs


@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("case", ["gqa-causal-lengths", "long-ring", "unbounded", "wide-bound",
                                  "persistent-lengths"])
def test_sm90_paths(H, dtype, case):
    """Both kernel families, forward and backward, against the oracle: causal with T != S,
    sequence lengths with empty rows and batches, GQA with per-head scales, more tiles than ring
    stages, the running-max path, and (persistent-lengths) more query tiles than an H100/H200 has
    SMs without a causal mask, so that the persistent forward walks several tiles per CTA, some
    with no keys. (The two families' outputs are often bit-identical: both
    sum in 16-element steps in the same order; bench.py's kernel vs kernel_sm80 shows which ran.)"""
    rng = np.random.default_rng()
    kw = dict(causal=False)
    sc = None
    if case == "gqa-causal-lengths":
        B, T, S, N, K = 3, 200, 333, 4, 2
        kw.update(causal=True, q_len=jnp.asarray([T, 150, 9], jnp.int32),
                  kv_len=jnp.asarray([S, 260, 0], jnp.int32))
        q, k, v = make(rng, B, T, S, N, K, H, dtype)
    elif case == "persistent-lengths":  # 9 query tiles x 8 heads x 3 batches = 216 work items
        B, T, S, N, K = 3, 1100, 700, 8, 2
        kw.update(q_len=jnp.asarray([T, 500, 77], jnp.int32),
                  kv_len=jnp.asarray([S, 333, 0], jnp.int32))
        q, k, v = make(rng, B, T, S, N, K, H, dtype)
    elif case == "long-ring":
        B, T, S, N, K = 1, 300, 1100, 2, 1
        q, k, v = make(rng, B, T, S, N, K, H, dtype)
    elif case == "unbounded":  # not l2-normalised: running max
        B, T, S, N, K = 2, 130, 400, 2, 2
        q, k, v = make(rng, B, T, S, N, K, H, dtype, normalize=False)
        kw.update(bounded=False, causal=True)
        sc = np.array([1.0, 0.5], np.float32)
    else:  # |scale| * groups beyond the fixed-shift window of f16 (and of bf16 at 60): running max
        B, T, S, N, K = 2, 129, 257, 2, 1
        q, k, v = make(rng, B, T, S, N, K, H, dtype)
        sc = np.array([60.0, -25.0], np.float32)
    if sc is None:
        sc = rng.uniform(5.0, 12.0, N).astype(np.float32)
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    ql = None if kw.get("q_len") is None else np.asarray(kw["q_len"])
    kl = None if kw.get("kv_len") is None else np.asarray(kw["kv_len"])
    ref = oracle(q, k, v, sc, q_len=ql, kv_len=kl, causal=kw["causal"], do=do)
    for res in _run_both(q, k, v, sc, do, **kw):
        check_all(res[:5] + (None,), ref, dtype)
        empty = np.isneginf(ref[1])
        assert np.all(np.asarray(res[0], np.float32).transpose(0, 2, 1, 3)[empty] == 0)
        assert np.all(np.asarray(res[2]).transpose(0, 2, 1, 3)[empty] == 0)


@pytest.mark.parametrize("H", [64, 128])
def test_sm90_deterministic_backward_is_bitwise_reproducible(H):
    """deterministic=True keeps the sm_90a backward free of reductions (dQ kernel + dK/dV kernel)
    even when the fused-dQ backward (which reduces into dq_acc) is requested."""
    rng = np.random.default_rng()
    B, T, S, N, K = 2, 700, 900, 4, 2
    q, k, v = make(rng, B, T, S, N, K, H, jnp.bfloat16)
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.bfloat16)
    sc = np.full((N,), 10.0, np.float32)
    det1, det2 = (run_kernel(q, k, v, sc, causal=True, do=do, deterministic=True, fused_dq=True)
                  for _ in range(2))
    fused = run_kernel(q, k, v, sc, causal=True, do=do, deterministic=False, fused_dq=True)
    for a, b in zip(det1, det2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(fused[2:5], det1[2:5]):
        assert relerr(a, b) < TOL[jnp.bfloat16], relerr(a, b)
