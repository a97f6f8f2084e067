"""jit, vmap (incl. unbatched k/v), vmap∘grad, checkpoint and scan all agree with the reference."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jax_cosine_attention import cosine_sim_attention, cosine_sim_attention_reference
from oracle import IMPLEMENTATIONS, rel_err

B, T, S, N, K, H = 2, 24, 20, 4, 2, 16


# The kernel computes in bf16/f16 (f32 inputs go to the XLA path), so its cases run in bf16.
PATHS = {"xla": (jnp.float32, lambda t: t), "cuda": (jnp.bfloat16, lambda t: 3e-2)}


@pytest.fixture(params=IMPLEMENTATIONS)
def attn(request):
    f = lambda *a, **kw: cosine_sim_attention(*a, **kw, implementation=request.param)
    f.dtype, f.tol = PATHS[request.param]  # input dtype, f32 tolerance -> this path's tolerance
    return f


def arrays(rng, *shapes, dtype=jnp.float32):
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def test_jit_matches_eager(rng, attn):
    q, k, v = arrays(rng, (B, T, N, H), (B, S, K, H), (B, S, K, H), dtype=attn.dtype)
    eager = attn(q, k, v, is_causal=True)
    jitted = jax.jit(lambda q, k, v: attn(q, k, v, is_causal=True))(q, k, v)
    assert rel_err(jitted, eager) < attn.tol(1e-6)


def test_vmap_with_unbatched_kv_and_shared_bias(rng, attn):
    V = 3
    q, k, v = arrays(rng, (V, B, T, N, H), (B, S, K, H), (B, S, K, H), dtype=attn.dtype)
    bias, = arrays(rng, (1, N, T, S))
    got = jax.vmap(lambda q: attn(q, k, v, bias, is_causal=True))(q)
    want = jnp.stack([cosine_sim_attention_reference(q[i], k, v, bias, is_causal=True)
                      for i in range(V)])
    assert rel_err(got, want) < attn.tol(1e-5)


def test_vmap_batched_bias_mask_and_lengths(rng, attn):
    V = 2
    q, k, v = arrays(rng, (V, B, T, N, H), (V, B, S, K, H), (V, B, S, K, H), dtype=attn.dtype)
    bias, = arrays(rng, (V, 1, N, T, S))
    mask = jnp.asarray(rng.uniform(size=(V, B, 1, 1, S)) < 0.7)
    kv_len = jnp.asarray([[S, 7], [11, S]], jnp.int32)
    f = lambda q, k, v, b, m, l: attn(q, k, v, b, m, key_value_seq_lengths=l)
    got = jax.vmap(f)(q, k, v, bias, mask, kv_len)
    want = jnp.stack([cosine_sim_attention_reference(q[i], k[i], v[i], bias[i], mask[i],
                                                     key_value_seq_lengths=kv_len[i])
                      for i in range(V)])
    assert rel_err(got, want) < attn.tol(1e-5)


@pytest.mark.parametrize("shared_bias", [False, True])
def test_vmap_of_grad_gives_per_example_gradients(rng, attn, shared_bias):
    V = 3
    q, k, v = arrays(rng, (V, B, T, N, H), (B, S, K, H), (B, S, K, H), dtype=attn.dtype)
    bias, = arrays(rng, (1, N, T, S) if shared_bias else (B, N, T, S))
    scale = jnp.asarray(rng.uniform(5, 15, size=N), jnp.float32)

    def loss(f, q, k, v, bias, scale):
        return jnp.sum(jnp.sin(f(q, k, v, bias, scale=scale, is_causal=True)))

    got = jax.vmap(jax.grad(lambda *a: loss(attn, *a), argnums=(0, 1, 2, 3, 4)),
                   in_axes=(0, None, None, None, None))(q, k, v, bias, scale)
    ref = jax.grad(lambda *a: loss(cosine_sim_attention_reference, *a), argnums=(0, 1, 2, 3, 4))
    for i in range(V):
        want = ref(q[i], k, v, bias, scale)
        for g, w in zip(got, want):
            assert rel_err(g[i], w) < attn.tol(1e-4)


def test_vmap_over_per_example_scale(rng, attn):
    V = 2
    q, k, v = arrays(rng, (B, T, N, H), (B, S, K, H), (B, S, K, H), dtype=attn.dtype)
    scales = jnp.asarray([3.0, 12.0])
    got = jax.vmap(lambda s: attn(q, k, v, scale=s))(scales)
    want = jnp.stack([cosine_sim_attention_reference(q, k, v, scale=s) for s in scales])
    assert rel_err(got, want) < attn.tol(1e-5)


def test_checkpoint_and_scan(rng, attn):
    layers = 3
    x, = arrays(rng, (B, T, N, H), dtype=attn.dtype)
    wk = jnp.asarray(rng.normal(size=(layers, H, H)) / np.sqrt(H), attn.dtype)

    def model(f, x, wk):
        def layer(h, w):
            kv = jnp.einsum("btnh,hd->btnd", h, w)
            return jax.checkpoint(lambda h, kv: f(h, kv, kv, is_causal=True))(h, kv) + h, None
        return jnp.sum(jax.lax.scan(layer, x, wk)[0] ** 2)

    got = jax.jit(jax.grad(lambda x, w: model(attn, x, w), argnums=(0, 1)))(x, wk)
    want = jax.grad(lambda x, w: model(cosine_sim_attention_reference, x, w), argnums=(0, 1))(x, wk)
    for g, w in zip(got, want):
        assert rel_err(g, w) < attn.tol(1e-4)
