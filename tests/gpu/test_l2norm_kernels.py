"""Fused l2norm kernels (`cuda/l2norm_kernel.cu` via `_l2norm_op`) against a float64 oracle (jax
autodiff of `normalize.l2norm` with x64), forward and gradient; and the public attention through
the fused path against the float64 attention oracle.

Outputs are poisoned with NaN before every kernel call (JCA_DEBUG_POISON=1, tests/gpu/conftest.py),
so an element the kernels never write fails the test. Run from OUTSIDE the repo root so the
installed package (with the .so) is imported.
"""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cosine_attention import _cuda, _l2norm_op, normalize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/oracle.py
import oracle  # noqa: E402

DTYPES = (jnp.bfloat16, jnp.float16)
# Largest relative error of one rounding to the dtype (half a unit in the last place at the bottom
# of a binade), with a little room for the f32 math before it.
ULP = {jnp.dtype(jnp.bfloat16): 1.01 * 2.0 ** -8, jnp.dtype(jnp.float16): 1.01 * 2.0 ** -11}
TINY = {jnp.dtype(jnp.bfloat16): 1e-30, jnp.dtype(jnp.float16): 2.0 ** -24}  # f16 subnormals


def _rng():
    seed = np.random.SeedSequence().entropy % (2 ** 32)
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def _f64_oracle(x, dy, groups, eps):
    """y and dx in float64 from the same (rounded) x and dy: jax autodiff of normalize.l2norm."""
    with oracle.x64():
        xx = jnp.asarray(np.asarray(x, np.float64))
        y, vjp = jax.vjp(lambda x: normalize.l2norm(x, groups, eps), xx)
        dx = vjp(jnp.asarray(np.asarray(dy, np.float64)))[0]
        return np.asarray(y), np.asarray(dx)


def _fused(x, dy, groups, eps):
    @jax.jit
    def f(x, dy):
        y, vjp = jax.vjp(lambda x: _l2norm_op.l2norm(x, groups, eps), x)
        return y, vjp(dy)[0]
    return f(x, dy)


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _check(x, dy, groups, eps, dtype):
    y, dx = _fused(x, dy, groups, eps)
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape and dx.shape == x.shape
    y_ref, dx_ref = _f64_oracle(_f64(x), _f64(dy), groups, eps)
    y, dx = _f64(y), _f64(dx)
    assert not np.isnan(y).any() and not np.isnan(dx).any(), "NaN: an element was not written"
    ulp, tiny = ULP[jnp.dtype(dtype)], TINY[jnp.dtype(dtype)]
    # y: f32 math (pairwise sums), one rounding to the output dtype
    np.testing.assert_allclose(y, y_ref, rtol=ulp, atol=tiny)
    # dx = (dy - y<y,dy>)/n cancels: per group, f32 errors are relative to |dy| / n
    H = x.shape[-1]
    gs = H // groups
    scale = np.sqrt(np.sum(_f64(dy).reshape(-1, groups, gs) ** 2, -1, keepdims=True))
    n = np.sqrt(np.maximum(np.sum(_f64(x).reshape(-1, groups, gs) ** 2, -1, keepdims=True),
                           np.float64(np.float32(eps)) ** 2))
    bound = ulp * np.abs(dx_ref).reshape(-1, groups, gs) + 1e-5 * scale / n + tiny
    err = np.abs(dx - dx_ref).reshape(-1, groups, gs)
    assert np.all(err <= bound), f"dx max err/bound {np.max(err / np.maximum(bound, 1e-300))}"
    return y, dx


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("H,groups", [(16, 1), (32, 1), (64, 1), (96, 1), (128, 1), (256, 1),
                                      (128, 2), (128, 4), (64, 16), (96, 4), (96, 3), (160, 1),
                                      (256, 8), (8, 1), (16, 16), (512, 1), (512, 4), (1024, 1),
                                      (1024, 2), (384, 3)])
def test_fwd_bwd_vs_f64(dtype, H, groups):
    """Head dims of 2..32 lanes (12, 20 of 16/32 lanes busy at H=96/160), 2 and 4 vectors per
    lane (H=512, 1024), groups inside a lane (H=64/16: 4 elements) and across 3, 12, 20 lanes;
    555 rows (not a multiple of any block)."""
    rng = _rng()
    x = jnp.asarray(rng.normal(size=(3, 37, 5, H)) * rng.uniform(0.1, 10, size=(3, 37, 5, 1)), dtype)
    dy = jnp.asarray(rng.normal(size=x.shape), dtype)
    _check(x, dy, groups, normalize.DEFAULT_EPS, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("groups", [1, 4])
def test_zero_and_tiny_rows(dtype, groups):
    """sumsq <= eps^2: the norm is eps, y = x / eps, dx = dy / eps (bf16 keeps 1e-14; f16 needs a
    larger eps for dy / eps to stay finite)."""
    rng = _rng()
    eps = normalize.DEFAULT_EPS if dtype == jnp.bfloat16 else 1e-3
    tiny = 1e-14 if dtype == jnp.bfloat16 else 5e-5
    x = rng.normal(size=(261, 128)).astype(np.float32)
    x[::7] = 0.0
    x[3::7] = tiny
    x[5::7, :32] = 0.0  # one zero group (groups = 4)
    x = jnp.asarray(x, dtype)
    dy = jnp.asarray(rng.normal(size=x.shape), dtype)
    y, dx = _check(x, dy, groups, eps, dtype)
    assert np.all(y[::7] == 0)

    def xla(x, dy):  # XLA's own l2norm and its autodiff, on the GPU
        y, vjp = jax.vjp(lambda x: normalize.l2norm(x, groups, eps), x)
        return y, vjp(dy)[0]
    y_x, dx_x = (_f64(a) for a in jax.jit(xla)(x, dy))
    rows = np.r_[0:261:7, 3:261:7]
    ulp = 2 * ULP[jnp.dtype(dtype)]  # two roundings (XLA may multiply by rsqrt, the kernel by 1/n)
    np.testing.assert_allclose(y[rows], y_x[rows], rtol=ulp, atol=0)
    np.testing.assert_allclose(dx[rows], dx_x[rows], rtol=ulp, atol=0)
    assert np.all(np.isfinite(dx))


def test_empty_and_rank1():
    for shape in ((0, 64), (2, 0, 3, 64), (64,)):
        x = jnp.ones(shape, jnp.bfloat16)
        y, dx = _fused(x, x, 1, normalize.DEFAULT_EPS)
        assert y.shape == shape and dx.shape == shape
        if x.size:
            np.testing.assert_allclose(_f64(y), 1 / 8, rtol=2 ** -8)


def test_supported_table_matches_extension():
    for h in range(0, 1100):
        for groups in (1, 2, 3, 4, 5, 8, 12, 16, 32, 64, 128):
            assert _cuda._C.l2norm_supported(h, groups) == _l2norm_op.kernel_supports(
                h, groups, jnp.bfloat16), (h, groups)


def test_fused_matches_xla_on_gpu_and_lowers_to_kernel():
    rng = _rng()
    x = jnp.asarray(rng.normal(size=(2, 300, 4, 128)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
    f = jax.jit(lambda x, dy: jax.vjp(lambda x: _l2norm_op.l2norm(x, 2), x)[1](dy)[0])
    assert "jca_l2norm_bwd" in f.lower(x, dy).compile().as_text()
    ref = jax.jit(lambda x, dy: jax.vjp(lambda x: normalize.l2norm(x, 2), x)[1](dy)[0])
    assert oracle.rel_err(f(x, dy), ref(x, dy)) < 1e-2
    assert oracle.rel_err(_l2norm_op.l2norm(x, 2), normalize.l2norm(x, 2)) < 4e-3


def test_vmap_and_scan_on_gpu():
    rng = _rng()
    x = jnp.asarray(rng.normal(size=(3, 50, 2, 64)), jnp.float16)
    y = jax.jit(jax.vmap(lambda x: _l2norm_op.l2norm(x, 2), in_axes=1, out_axes=1))(x)
    assert oracle.rel_err(y, normalize.l2norm(x, 2)) < 2e-3
    g = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(_l2norm_op.l2norm(x).astype(jnp.float32) ** 3))))(x)
    g_ref = jax.vmap(jax.grad(lambda x: jnp.sum(normalize.l2norm(x).astype(jnp.float32) ** 3)))(x)
    assert oracle.rel_err(g, g_ref) < 1e-2

    def step(c, _):
        return _l2norm_op.l2norm(c * 2, 2), None
    out = jax.jit(lambda x: jax.lax.scan(step, x, None, length=10)[0])(x)
    assert oracle.rel_err(out, normalize.l2norm(x, 2)) < 4e-3


# ---------------------------------------------------------------- the public op, fused path

@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("H,groups,causal", [(64, 1, True), (128, 1, False), (128, 2, False),
                                             (96, 4, True)])
def test_public_op_fused_l2norm_vs_oracle(dtype, H, groups, causal):
    """cosine_sim_attention(implementation="cuda") normalises q, k with the fused kernels: forward
    and gradients of q, k, v, scale against the float64 reference (q, k not pre-normalised, so
    the l2norm backward is exercised, with dq = scale * dq_acc as its cotangent)."""
    rng = _rng()
    B, T, S, N, K = 2, 70, 90, 4, 2
    diff = dict(query=rng.normal(size=(B, T, N, H)) * 3, key=rng.normal(size=(B, S, K, H)) * 0.5,
                value=rng.normal(size=(B, S, K, H)), scale=rng.uniform(5, 12, size=(N,)))
    static = dict(groups=groups, is_causal=causal)
    oracle.check_against_oracle(rng, dtype, diff=diff, static=static, implementation="cuda")
    q = jnp.zeros((B, T, N, H), dtype)
    k = jnp.zeros((B, S, K, H), dtype)
    import jax_cosine_attention as jca
    txt = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jca.cosine_sim_attention(
        q, k, v, implementation="cuda", groups=groups).astype(jnp.float32)), argnums=(0, 1))
    ).lower(q, k, k).compile().as_text()
    names = set(re.findall(r"jca_l2norm_\w+", txt))
    # Where the sm_90a kernels apply the l2norm backward in their epilogues, no l2norm backward
    # kernel runs (the attention backward call carries norm_eps).
    fused_bwd = groups == 1 and _cuda.fuses_norm_bwd(H, dtype)
    assert "jca_l2norm_fwd" in names and ("jca_l2norm_bwd" in names) != fused_bwd, names
    assert _norm_eps_attrs(txt) == ([True] if fused_bwd else [False]), _norm_eps_attrs(txt)


def _norm_eps_attrs(hlo):
    """Per attention backward call in compiled HLO text: whether it fuses the l2norm backward
    (its norm_eps attribute is >= 0)."""
    return [float(v) >= 0 for v in re.findall(r"norm_eps\s*=\s*([-+0-9.eE]+)", hlo)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_l2norm_backward_matches_unfused(dtype, H, deterministic, monkeypatch):
    """The l2norm backward in the sm_90a kernels' epilogues (dq, dk of the raw inputs, dscale
    from the per-row sums) against the separate l2norm backward kernels, on rows that exercise
    the eps clamp (zero and tiny rows of q and k), causal with T != S, lengths and GQA."""
    if not _cuda.fuses_norm_bwd(H, dtype):
        pytest.skip("needs the sm_90a two-kernel backward (an sm_90 device)")
    import jax_cosine_attention as jca
    rng = _rng()
    B, T, S, N, K = 2, 200, 333, 4, 2
    q = rng.normal(size=(B, T, N, H)) * 3
    k = rng.normal(size=(B, S, K, H)) * 0.5
    q[1, 7] = 0.0
    k[0, 11] = 0.0
    k[1, 3, 1] = 1e-8  # norm below eps: clamped
    q, k, v, ct = (jnp.asarray(x, dtype) for x in (q, k, rng.normal(size=(B, S, K, H)),
                                                      rng.normal(size=(B, T, N, H))))
    eps = 1e-3  # a clamped row's gradient is ~scale/eps: finite in f16 too
    scale = jnp.asarray(rng.uniform(5, 12, size=N), jnp.float32)
    kv_len = jnp.asarray([S, S - 40], jnp.int32)
    q_len = jnp.asarray([T - 9, T], jnp.int32)

    def grads():
        def loss(q, k, v, scale):
            out = jca.cosine_sim_attention(q, k, v, scale=scale, is_causal=True,
                                           query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
                                           implementation="cuda", deterministic=deterministic,
                                           eps=eps)
            return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))
        f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        return f(q, k, v, scale), f.lower(q, k, v, scale).compile().as_text()

    fused, txt = grads()
    assert _norm_eps_attrs(txt) == [True] and "jca_l2norm_bwd" not in txt
    monkeypatch.setenv("JCA_FUSED_NORM_BWD", "0")
    unfused, txt = grads()
    assert _norm_eps_attrs(txt) == [False] and "jca_l2norm_bwd" in txt
    tol = 3e-2 if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) else 4e-3
    for name, g, w in zip(("dq", "dk", "dv", "dscale"), fused, unfused):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g)), name
        # rows: the clamped ones carry gradients ~1/eps, so compare each row on its own scale
        if g.ndim == 4:
            g, w = g.reshape(-1, H), w.reshape(-1, H)
            scale_row = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-3)
            err = np.abs(g - w) / scale_row
        else:
            err = np.abs(g - w) / max(np.abs(w).max(), 1e-3)
        assert err.max() < tol, (name, float(err.max()))


@pytest.mark.parametrize("H", [64, 128])
def test_fused_l2norm_backward_eps0_rows_without_keys(H, monkeypatch):
    """eps = 0 (no clamp) with query tiles that see no key (a batch without valid keys, and the
    causal rows before the first key when T > S): their dq_acc is zero, and the fused epilogue
    writes dq = 0 as the l2norm backward kernels do, not 0 * 1/sqrt(0) = NaN."""
    dtype = jnp.bfloat16
    if not _cuda.fuses_norm_bwd(H, dtype):
        pytest.skip("needs the sm_90a two-kernel backward (an sm_90 device)")
    import jax_cosine_attention as jca
    rng = _rng()
    B, T, S, N = 2, 300, 100, 2
    q, k, v, ct = (jnp.asarray(rng.normal(size=shape), dtype) for shape in
                   ((B, T, N, H), (B, S, N, H), (B, S, N, H), (B, T, N, H)))
    kv_len = jnp.asarray([S, 0], jnp.int32)

    def grads():
        def loss(q, k, v):
            out = jca.cosine_sim_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_len,
                                           implementation="cuda", eps=0.0)
            return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    fused = grads()
    monkeypatch.setenv("JCA_FUSED_NORM_BWD", "0")
    unfused = grads()
    for name, g, w in zip(("dq", "dk", "dv"), fused, unfused):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, rtol=3e-2, atol=3e-2 * np.abs(w).max(), err_msg=name)
    dq = np.asarray(fused[0], np.float32)
    assert np.all(dq[1] == 0) and np.all(dq[0, : T - S] == 0)  # rows that see no key
