"""The fused l2norm op (`_l2norm_op`) on CPU: its XLA fallback (the `default` branch of
`platform_dependent`, what runs off CUDA) equals `normalize.l2norm` forward and gradient, under
jit, vmap, grad-of-vmap and vmap-of-grad, with groups and rows below eps; lowering for "cuda"
emits the kernels' FFI calls; leading-dim sharding without collectives (subprocess with 4 host
devices). The kernels themselves are tested against a float64 oracle in tests/gpu/.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cosine_attention import _cuda, _l2norm_op, normalize

DTYPES = (jnp.bfloat16, jnp.float16)


@pytest.fixture(params=[False, True], ids=["no-ext", "cuda-traced"])
def cuda_traced(request, monkeypatch):
    """True: pretend the extension is available, so the op traces platform_dependent with its
    CUDA branch (the CPU lowers the default branch)."""
    if request.param:
        monkeypatch.setattr(_cuda, "AVAILABLE", True)
        monkeypatch.setattr(_cuda, "IMPORT_ERROR", None)
    return request.param


def _input(rng, shape, dtype, zero_rows=True):
    x = rng.normal(size=shape).astype(np.float32)
    if zero_rows:
        flat = x.reshape(-1, shape[-1])
        flat[0] = 0.0                  # sumsq = 0 < eps^2: norm is eps, dx = dy / eps
        flat[-1, : shape[-1] // 2] = 0.0  # a zero group when groups >= 2
        if flat.shape[0] > 2:
            flat[1] = 1e-14              # tiny but nonzero, below eps (bf16 keeps it; f16 -> 0)
    return jnp.asarray(x, dtype)


def _vjp(fn, x, ct):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(ct)[0]


def _same(a, b):
    """Equal up to one rounding of the output dtype: the f32 math is the same, but XLA may fuse
    (and so round) it differently in a different context (custom_vjp recomputes the forward)."""
    ulp = float(jnp.finfo(jnp.asarray(b).dtype).eps)
    a, b = np.asarray(jnp.asarray(a, jnp.float32)), np.asarray(jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(a, b, rtol=ulp, atol=0)


def _same_grad(a, b):
    """_same for dx = (dy - y<y,dy>) / n: where the difference cancels, an f32 rounding that XLA
    places differently moves a small element by a few of its own ulps, so each element may also
    be off by a few f32 roundings of its row's largest element (far below the dtype's ulp)."""
    ulp = float(jnp.finfo(jnp.asarray(b).dtype).eps)
    a, b = np.asarray(jnp.asarray(a, jnp.float32)), np.asarray(jnp.asarray(b, jnp.float32))
    row_max = np.max(np.abs(b), axis=-1, keepdims=True)
    assert np.all(np.isfinite(a))
    bound = ulp * np.abs(b) + 16 * float(np.finfo(np.float32).eps) * row_max
    bad = np.abs(a - b) > bound
    assert not bad.any(), f"{bad.sum()} elements off: {a[bad][:4]} vs {b[bad][:4]}"


def _close(a, b):
    """Norm-wise: compositions (vmap of grad of a nonlinear loss, scan) amplify a one-ulp
    difference of y through the cancellation in dx = (dy - y<y,dy>) / n."""
    ulp = float(jnp.finfo(jnp.asarray(b).dtype).eps)
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    assert np.all(np.isfinite(a)) and np.linalg.norm(a - b) <= 2 * ulp * np.linalg.norm(b)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("shape,groups", [((2, 5, 3, 64), 1), ((2, 5, 3, 64), 4),
                                          ((7, 96), 3), ((3, 2, 128), 32), ((4, 4, 16), 16)])
def test_fallback_equals_l2norm(rng, cuda_traced, dtype, shape, groups):
    x = _input(rng, shape, dtype)
    eps = 1e-3 if dtype == jnp.float16 else normalize.DEFAULT_EPS  # dy / eps fits in f16
    ct = jnp.asarray(rng.normal(size=shape), dtype)
    fused = jax.jit(lambda x, ct: _vjp(lambda x: _l2norm_op.l2norm(x, groups, eps), x, ct))
    ref = jax.jit(lambda x, ct: _vjp(lambda x: normalize.l2norm(x, groups, eps), x, ct))
    (y, dx), (y_ref, dx_ref) = fused(x, ct), ref(x, ct)
    assert y.dtype == dtype and dx.dtype == dtype
    _same(y, y_ref)
    _same_grad(dx, dx_ref)
    # eager, too (no outer jit)
    _same(_l2norm_op.l2norm(x, groups, eps), y_ref)


def test_zero_rows_eps_branch(cuda_traced):
    """Rows with sumsq <= eps^2: the norm is the constant eps, so y = x / eps and dx = dy / eps."""
    x = jnp.zeros((3, 64), jnp.bfloat16).at[1].set(1e-14)
    ct = jnp.ones((3, 64), jnp.bfloat16)
    y, dx = jax.jit(lambda x: _vjp(_l2norm_op.l2norm, x, ct))(x)
    np.testing.assert_allclose(np.asarray(y[1], np.float32), 1e-14 / 1e-12, rtol=1e-2)
    assert np.all(np.asarray(y[0], np.float32) == 0)
    np.testing.assert_allclose(np.asarray(dx, np.float32), 1e12, rtol=1e-2)


@pytest.mark.parametrize("groups", [1, 2])
def test_vmap(rng, cuda_traced, groups):
    x = _input(rng, (3, 4, 6, 32), jnp.bfloat16)
    ct = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
    for in_axes in (0, 1, 2):
        f = lambda fn: jax.vmap(lambda x: fn(x, groups), in_axes=in_axes, out_axes=in_axes)
        _same(jax.jit(f(_l2norm_op.l2norm))(x), f(normalize.l2norm)(x))
        g = lambda fn: jax.vjp(f(fn), x)[1](ct)[0]
        _same_grad(jax.jit(lambda: g(_l2norm_op.l2norm))(), g(normalize.l2norm))

    def loss(fn):
        return lambda x: jnp.sum(fn(x, groups).astype(jnp.float32) ** 3)
    _close(jax.jit(jax.vmap(jax.grad(loss(_l2norm_op.l2norm))))(x),
           jax.vmap(jax.grad(loss(normalize.l2norm)))(x))
    # nested vmap, and per-example cotangents against an unbatched x (x broadcast in the rule)
    nested = jax.vmap(jax.vmap(lambda x: _l2norm_op.l2norm(x, groups)))
    _same(jax.jit(nested)(x), normalize.l2norm(x, groups))
    cts = jnp.asarray(rng.normal(size=(5,) + x.shape[1:]), jnp.bfloat16)
    per_ct = lambda fn: jax.vmap(jax.vjp(lambda x: fn(x, groups), x[0])[1])(cts)[0]
    _same_grad(jax.jit(lambda: per_ct(_l2norm_op.l2norm))(), per_ct(normalize.l2norm))


def test_checkpoint_and_scan(rng, cuda_traced):
    x = _input(rng, (4, 2, 64), jnp.float16, zero_rows=False)

    def body(fn):
        def step(c, _):
            return jax.checkpoint(lambda c: fn(c * 1.5, 2))(c), None
        return lambda x: jnp.sum(jax.lax.scan(step, x, None, length=3)[0].astype(jnp.float32) ** 2)
    _close(jax.jit(jax.grad(body(_l2norm_op.l2norm)))(x), jax.jit(jax.grad(body(normalize.l2norm)))(x))


def test_unserved_inputs_fall_back(rng, monkeypatch):
    """f32, head dims off the kernel's grid and groups of 3 elements go to normalize.l2norm."""
    monkeypatch.setattr(_cuda, "AVAILABLE", True)
    for shape, dtype, groups in (((4, 64), jnp.float32, 1), ((4, 12), jnp.bfloat16, 1),
                                 ((4, 96), jnp.bfloat16, 32), ((4, 1032), jnp.float16, 1)):
        assert not _l2norm_op.kernel_supports(shape[-1], groups, dtype)
        x = jnp.asarray(rng.normal(size=shape), dtype)
        txt = jax.jit(lambda x: _l2norm_op.l2norm(x, groups)).trace(x).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "jca_l2norm" not in txt
        _same(_l2norm_op.l2norm(x, groups), normalize.l2norm(x, groups))
    with pytest.raises(ValueError, match="groups"):
        _l2norm_op.l2norm(jnp.zeros((2, 64), jnp.bfloat16), 3)


def test_kernel_supports():
    ok = _l2norm_op.kernel_supports
    for h in (8, 16, 32, 64, 96, 128, 256):
        for groups in (1, 2, 4, 8):
            if h % groups == 0 and (h // groups) % 8 == 0:
                assert ok(h, groups, jnp.bfloat16) and ok(h, groups, jnp.float16), (h, groups)
    assert ok(64, 64, jnp.bfloat16) and ok(64, 16, jnp.bfloat16)   # groups of 1 and 4
    assert ok(96, 4, jnp.bfloat16)                                  # 24 = 3 lanes of 8
    assert not ok(96, 32, jnp.bfloat16)                             # groups of 3
    assert ok(512, 1, jnp.bfloat16) and ok(1024, 2, jnp.bfloat16)
    assert not ok(264, 1, jnp.bfloat16) and not ok(2048, 1, jnp.bfloat16)
    assert not ok(128, 1, jnp.float32)


def _calls(txt):
    return re.findall(r"custom_call @(jca_l2norm_\w+)\(.*?mhlo\.backend_config = \{([^}]*)\}", txt)


def test_lowering_emits_kernels(monkeypatch):
    monkeypatch.setattr(_cuda, "AVAILABLE", True)
    x = jnp.zeros((2, 16, 4, 64), jnp.bfloat16)

    def f(x):
        y, vjp = jax.vjp(lambda x: _l2norm_op.l2norm(x, 4, 1e-6), x)
        return y, vjp(y)[0]

    txt = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    calls = dict(_calls(txt))
    assert set(calls) == {"jca_l2norm_fwd", "jca_l2norm_bwd"}, txt[:2000]
    for attrs in calls.values():
        assert "groups = 4 : i64" in attrs and "eps = 9.99999997E-7 : f32" in attrs, attrs
    # and on CPU the same function lowers to plain XLA
    assert "jca_l2norm" not in jax.jit(f).trace(x).lower(lowering_platforms=("cpu",)).as_text()


def test_public_op_uses_fused_l2norm(monkeypatch):
    """implementation "cuda" normalises q and k with the fused op; "xla" does not."""
    monkeypatch.setattr(_cuda, "AVAILABLE", True)
    import jax_cosine_attention as jca
    q = jnp.zeros((2, 32, 4, 64), jnp.bfloat16)
    k = jnp.zeros((2, 32, 2, 64), jnp.bfloat16)

    def lowered(impl, l2norm_qk=True):
        loss = lambda q, k, v: jnp.sum(jca.cosine_sim_attention(
            q, k, v, implementation=impl, l2norm_qk=l2norm_qk).astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
            lowering_platforms=("cuda",)).as_text()
    names = {re.sub(r"\(.*", "", n) for n in re.findall(r"custom_call @(jca_\w+)", lowered(None))}
    assert names == {"jca_cosattn_fwd", "jca_cosattn_bwd", "jca_l2norm_fwd", "jca_l2norm_bwd"}
    assert "jca_l2norm" not in lowered("xla")
    assert "jca_l2norm" not in lowered(None, l2norm_qk=False)


@pytest.fixture(scope="module")
def sharding_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("l2norm_sharding_check.py"))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("mode", ["Auto", "Explicit"])
@pytest.mark.parametrize("spec", ["batch_heads", "seq_heads", "batch_seq"])
def test_sharded_leading_dims_no_collectives(sharding_results, mode, spec):
    r = sharding_results[f"op-{mode}"][spec]
    assert r["collectives"] == [], r
    assert r["max_err"] < 2e-3, r  # bf16 outputs; XLA may fuse the unsharded f32 math differently
    assert all(s == r["in_spec"] for s in r["out_spec"]), r


def test_under_shard_map(sharding_results):
    r = sharding_results["shard_map"]
    assert r["collectives"] == [] and r["max_err"] < 2e-3, r


@pytest.mark.parametrize("mode", ["Auto", "Explicit"])
@pytest.mark.parametrize("how", ["jit", "helper"])
def test_public_op_sharded(sharding_results, mode, how):
    r = sharding_results[f"public-{mode}"][how]
    assert r["collectives"] == [], r
    assert r["max_err"] < 1e-2, r
