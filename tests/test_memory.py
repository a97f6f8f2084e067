"""The XLA path's extra memory is O(T + S): compiled temp memory of jit(grad) at T=S=16384."""

import jax
import jax.numpy as jnp

from jax_cosine_attention import cosine_sim_attention, _xla


def test_grad_temp_memory_far_below_dense_scores(monkeypatch):
    monkeypatch.setattr(_xla, "BLOCK_SIZES", (512, 512))  # the library default
    T = S = 16384
    H = 64
    q = jax.ShapeDtypeStruct((1, T, 1, H), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(cosine_sim_attention(q, k, v, is_causal=True,
                                                        implementation="xla").astype(jnp.float32))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    dense_scores = T * S * 4  # one float32 [T, S] score matrix: 1 GiB
    assert temp < dense_scores / 16, f"temp {temp / 2**20:.1f} MiB"
