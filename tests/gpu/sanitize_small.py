"""One small fused forward + backward (bias, key-padding mask, lengths, causal, GQA) for
`compute-sanitizer --tool memcheck`. Exits non-zero on a wrong or non-finite result."""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_cosine_attention import _cuda  # noqa: E402

assert _cuda.AVAILABLE, _cuda.IMPORT_ERROR
rng = np.random.default_rng(0)
B, T, S, N, K = 2, 37, 53, 4, 2
for H, dt in ((64, jnp.bfloat16), (128, jnp.float16), (16, jnp.bfloat16)):
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), dt)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), dt)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), dt)
    q = (q / jnp.linalg.norm(q.astype(jnp.float32), axis=-1, keepdims=True)).astype(dt)
    k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(dt)
    bias = jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32)
    mask = jnp.asarray(rng.random((B, 1, 1, S)) > 0.2)
    ql = jnp.asarray([T, 20], jnp.int32)
    kl = jnp.asarray([S, 30], jnp.int32)
    sc = jnp.full((N,), 10.0, jnp.float32)
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dt)

    @jax.jit
    def f(q, k, v, bias, mask, do):
        o, lse = _cuda.fwd(q, k, v, sc, bias, mask, ql, kl, causal=True, groups=1, bounded=True)
        g = _cuda.bwd(do, q, k, v, o, lse, sc, bias, mask, ql, kl, causal=True, groups=1,
                      bounded=True, need_dbias=True, deterministic=False)  # dq kernel path
        g2 = _cuda.bwd(do, q, k, v, o, lse, sc, bias, mask, ql, kl, causal=True, groups=1,
                       bounded=True, need_dbias=False, deterministic=False)  # fused dQ path
        return (o,) + tuple(g) + tuple(g2[:3])

    outs = jax.block_until_ready(f(q, k, v, bias, mask, do))
    for x in outs:
        assert np.isfinite(np.asarray(x, np.float32)).all()
    print(f"sanitize_small H={H} {jnp.dtype(dt).name}: ok")

# The sm_90a kernels (no bias, no dense mask; taken on sm_90 devices when built), checked against
# the sm_80 kernels: lengths with an empty batch, causal T != S, GQA, a partial last key tile.
for H, dt in ((64, jnp.bfloat16), (128, jnp.float16)):
    T, S = 70, 300
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), dt)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), dt)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), dt)
    q = (q / jnp.linalg.norm(q.astype(jnp.float32), axis=-1, keepdims=True)).astype(dt)
    k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(dt)
    ql = jnp.asarray([T, 41], jnp.int32)
    kl = jnp.asarray([S, 0], jnp.int32)
    sc = jnp.full((N,), 10.0, jnp.float32)
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dt)

    def fb(sm90, fused=False):
        o, lse = _cuda.fwd(q, k, v, sc, None, None, ql, kl, causal=True, groups=1, bounded=True,
                           sm90=sm90)
        g = _cuda.bwd(do, q, k, v, o, lse, sc, None, None, ql, kl, causal=True, groups=1,
                      bounded=True, need_dbias=False, deterministic=False, sm90=sm90,
                      fused_dq=fused)
        return jax.block_until_ready((o, lse) + tuple(g[:3]))

    r90_det = fb(True)  # dQ kernel + plain dK/dV kernel (the default)
    r90 = fb(True, fused=True)  # the opt-in fused-dQ backward
    r80 = fb(False)
    assert np.array_equal(np.isneginf(np.asarray(r90[1])), np.isneginf(np.asarray(r80[1])))
    errs = []
    pairs = list(zip(("o", "lse", "dq_acc", "dk", "dv"), r90, r80))
    pairs += [("2-kernel " + n, x, y) for n, x, y in zip(("dq_acc", "dk", "dv"), r90_det[2:], r80[2:])]
    for name, x, y in pairs:
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        fin = np.isfinite(y)
        assert np.array_equal(np.isfinite(x), fin), f"{name}: non-finite pattern differs"
        err = np.abs(x[fin] - y[fin]).max() / max(1.0, np.abs(y[fin]).max())
        assert err < 3e-2, f"sm_90a vs sm_80 {name}: relative max diff {err}"
        errs.append(f"{name} {err:.1e}")
    print(f"sanitize_small sm90 H={H} {jnp.dtype(dt).name}: ok ({', '.join(errs)}; "
          f"sm_90a built {_cuda.SM90_BUILT})")

    # The l2norm backward fused into the epilogues: raw q, k (q, k above are their l2norms) ->
    # gradients of the raw inputs, against the unfused kernels + the l2norm backward kernel.
    if _cuda.fuses_norm_bwd(H, dt):
        from jax_cosine_attention import _l2norm_op
        qr = jnp.asarray(rng.standard_normal((B, T, N, H)) * 3, dt).at[0, 5].set(0)
        kr = jnp.asarray(rng.standard_normal((B, S, K, H)) * 0.5, dt)
        eps = 1e-3  # the zero row's gradient is ~scale/eps: finite in f16 too
        qn, kn = _l2norm_op.l2norm(qr, 1, eps), _l2norm_op.l2norm(kr, 1, eps)
        o, lse = _cuda.fwd(qn, kn, v, sc, None, None, ql, kl, causal=True, groups=1, bounded=True)
        dq, dk, _, _, rowdot = _cuda.bwd(do, qn, kn, v, o, lse, sc, None, None, ql, kl,
                                         causal=True, groups=1, bounded=True, need_dbias=False,
                                         deterministic=False, q_raw=qr, k_raw=kr, norm_eps=eps)
        dq_acc, dk_hat = _cuda.bwd(do, qn, kn, v, o, lse, sc, None, None, ql, kl, causal=True,
                                   groups=1, bounded=True, need_dbias=False,
                                   deterministic=False)[:2]
        def l2norm_vjp(x, dy):  # the fused l2norm backward kernel
            return jax.vjp(lambda x: _l2norm_op.l2norm(x, 1, eps), x)[1](dy.astype(dt))[0]
        want_dq = l2norm_vjp(qr, dq_acc * 10.0)
        want_dk = l2norm_vjp(kr, dk_hat)
        want_rowdot = jnp.einsum("btnh,btnh->bnt", qn.astype(jnp.float32), dq_acc)
        errs = []
        for name, x, y in (("dq", dq, want_dq), ("dk", dk, want_dk), ("rowdot", rowdot,
                                                                        want_rowdot)):
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
            assert np.all(np.isfinite(x)), name
            err = np.abs(x - y).max() / max(1.0, np.abs(y).max())
            assert err < 3e-2, f"fused l2norm backward {name}: relative max diff {err}"
            errs.append(f"{name} {err:.1e}")
        print(f"sanitize_small sm90 fused l2norm bwd H={H}: ok ({', '.join(errs)})")

# The persistent forward (sm_90a, no causal mask): 18 query tiles x 4 heads x 2 batches = 144 work
# items, more than an H100/H200 has SMs, so CTAs walk several tiles, the empty batch's with no keys.
B, T, S = 2, 2200, 300
for H, dt in ((64, jnp.bfloat16), (128, jnp.float16)):
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dt) for shape in
               ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    q = (q / jnp.linalg.norm(q.astype(jnp.float32), axis=-1, keepdims=True)).astype(dt)
    k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(dt)
    ql, kl = jnp.asarray([T, 1000], jnp.int32), jnp.asarray([S, 0], jnp.int32)
    sc = jnp.full((N,), 10.0, jnp.float32)
    got, want = (jax.block_until_ready(_cuda.fwd(q, k, v, sc, None, None, ql, kl, causal=False,
                                                 groups=1, bounded=True, sm90=sm90))
                 for sm90 in (True, False))
    for name, x, y in zip(("o", "lse"), got, want):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        fin = np.isfinite(y)
        assert np.array_equal(np.isfinite(x), fin), f"persistent {name}: non-finite pattern differs"
        err = np.abs(x[fin] - y[fin]).max() / max(1.0, np.abs(y[fin]).max())
        assert err < 3e-2, f"persistent sm_90a vs sm_80 {name}: relative max diff {err}"
    print(f"sanitize_small sm90 persistent forward H={H}: ok")
print("sanitize_small: done")
