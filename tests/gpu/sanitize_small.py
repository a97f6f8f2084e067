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
print("sanitize_small: done")

# The sm_90a forward (no bias, no dense mask; taken on sm_90 devices when built), checked against
# the sm_80 forward: lengths with an empty batch, causal T != S, GQA, a partial last key tile.
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
    o90, l90 = jax.block_until_ready(_cuda.fwd(q, k, v, sc, None, None, ql, kl, causal=True,
                                               groups=1, bounded=True, sm90=True))
    o80, l80 = _cuda.fwd(q, k, v, sc, None, None, ql, kl, causal=True, groups=1, bounded=True,
                         sm90=False)
    o90, o80 = np.asarray(o90, np.float32), np.asarray(o80, np.float32)
    assert np.isfinite(o90).all()
    err = np.abs(o90 - o80).max()
    assert err < 2e-2, f"sm_90a vs sm_80 forward: max abs diff {err}"
    assert np.array_equal(np.isneginf(np.asarray(l90)), np.isneginf(np.asarray(l80)))
    print(f"sanitize_small sm90 fwd H={H} {jnp.dtype(dt).name}: ok (max diff vs sm_80 {err:.2e}, "
          f"sm_90a built {_cuda.SM90_BUILT})")
