"""The op with the l2norm of q and k inside (`Config.norm_eps`, the CUDA path's route where the
sm_90a kernels apply the l2norm backward in their epilogues), through its XLA route here: the
same outputs and gradients as normalising first and running the plain op."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cosine_attention import _ops
from jax_cosine_attention.normalize import l2norm

EPS = 1e-6


def _cfg(causal, present, norm):
    return _ops.Config(is_causal=causal, groups=1, bounded=True, implementation="xla",
                       deterministic=False, present=present, bias_full=None, mask_full=None,
                       need_dbias=False, norm_eps=EPS if norm else None)


def _run(norm, q, k, v, scale, q_len, kv_len, causal):
    present = tuple(n for n, x in (("q_len", q_len), ("kv_len", kv_len)) if x is not None)
    cfg = _cfg(causal, present, norm)

    def loss(q, k, v, scale):
        if not norm:
            q, k = l2norm(q, 1, EPS), l2norm(k, 1, EPS)
        out = _ops.attention_core(q, k, v, scale, None, None, q_len, kv_len, cfg)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, scale)
    return out, grads


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal,T,S,N,K", [(True, 37, 53, 4, 2), (False, 40, 24, 2, 1)])
def test_norm_inside_op_matches_normalising_first(rng, dtype, causal, T, S, N, K):
    B, H = 2, 16
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)) * 3, dt)
    k = jnp.asarray(rng.normal(size=(B, S, K, H)) * 0.2, dt)
    k = k.at[0, 3].set(0)  # a zero key row: the eps clamp of the l2norm and its backward
    v = jnp.asarray(rng.normal(size=(B, S, K, H)), dt)
    scale = jnp.asarray(rng.uniform(5, 15, size=N), jnp.float32)
    q_len = jnp.asarray([T, T - 5], jnp.int32)
    kv_len = jnp.asarray([S - 3, S], jnp.int32)
    got = _run(True, q, k, v, scale, q_len, kv_len, causal)
    want = _run(False, q, k, v, scale, q_len, kv_len, causal)
    tol = 1e-5 if dtype == "float32" else 3e-2
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, np.abs(w).max()))


def test_norm_inside_op_under_vmap(rng):
    B, T, S, N, H = 2, 24, 24, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(3, B, L, N, H)), jnp.float32) for L in (T, S, S))
    scale = jnp.full((N,), 10.0, jnp.float32)

    def loss(norm, q, k, v):
        cfg = _cfg(True, (), norm)
        if not norm:
            q, k = l2norm(q, 1, EPS), l2norm(k, 1, EPS)
        return jnp.sum(jnp.sin(_ops.attention_core(q, k, v, scale, None, None, None, None, cfg)))

    grads = {norm: jax.vmap(jax.grad(lambda *a: loss(norm, *a), argnums=(0, 1, 2)))(q, k, v)
             for norm in (True, False)}
    for g, w in zip(grads[True], grads[False]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
