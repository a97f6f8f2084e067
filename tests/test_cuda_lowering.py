"""CPU test: lowering for the "cuda" platform emits the fused kernels' FFI custom calls.

No GPU or built extension is needed: availability is monkeypatched (jax_ffi.md §8), and lowering
with lowering_platforms=("cuda",) never executes anything.
"""
import re

import jax
import jax.numpy as jnp
import pytest

from jax_cosine_attention import _cuda


@pytest.fixture
def cuda_on(monkeypatch):
    monkeypatch.setattr(_cuda, "AVAILABLE", True)
    monkeypatch.setattr(_cuda, "IMPORT_ERROR", None)


def _calls(txt):
    return re.findall(r"custom_call @(jca_cosattn_\w+)\(.*?mhlo\.backend_config = \{([^}]*)\}", txt)


def test_direct_fwd_bwd_lowering(cuda_on):
    q = jnp.zeros((2, 64, 4, 64), jnp.bfloat16)
    k = jnp.zeros((2, 48, 2, 64), jnp.bfloat16)
    sc = jnp.ones((4,), jnp.float32)
    bias = jnp.zeros((1, 4, 64, 48), jnp.float32)
    mask = jnp.ones((2, 1, 1, 48), bool)
    kl = jnp.full((2,), 40, jnp.int32)

    def f(q, k, v):
        o, lse = _cuda.fwd(q, k, v, sc, bias, mask, None, kl, causal=True, groups=2, bounded=True)
        g = _cuda.bwd(o, q, k, v, o, lse, sc, bias, mask, None, kl, causal=True, groups=2,
                      bounded=True, need_dbias=True, deterministic=True)
        return o, lse, g

    txt = jax.jit(f).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    calls = dict(_calls(txt))
    assert set(calls) == {"jca_cosattn_fwd", "jca_cosattn_bwd"}, txt[:2000]
    assert "causal = true" in calls["jca_cosattn_fwd"]
    assert "groups = 2 : i64" in calls["jca_cosattn_fwd"]
    assert "need_dbias = true" in calls["jca_cosattn_bwd"]
    assert "deterministic = true" in calls["jca_cosattn_bwd"]
    # outputs: o bf16, lse f32 [B,N,T]; bwd: dq_acc f32, dk, dv, dbias f32, workspace u8
    assert "tensor<2x4x64xf32>" in txt
    assert f"tensor<{_cuda.bwd_workspace_bytes(2, 4, 64)}xui8>" in txt


def test_public_op_lowers_to_kernels(cuda_on):
    import jax_cosine_attention as jca
    if not hasattr(jca, "cosine_sim_attention"):
        pytest.skip("public op not available yet")
    q = jnp.zeros((2, 64, 4, 64), jnp.bfloat16)
    k = jnp.zeros((2, 64, 2, 64), jnp.bfloat16)
    bias = jnp.zeros((4, 64, 64), jnp.float32)

    def loss(q, k, v, bias):
        return jnp.sum(jca.cosine_sim_attention(q, k, v, bias, is_causal=True).astype(jnp.float32))

    txt = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, k, bias).lower(
        lowering_platforms=("cuda",)).as_text()
    names = {n for n, _ in _calls(txt)}
    assert names == {"jca_cosattn_fwd", "jca_cosattn_bwd"}


def test_public_op_with_the_l2norm_backward_fused(cuda_on, monkeypatch):
    """Where the sm_90a kernels fuse the l2norm backward (monkeypatched: no device here), the
    public op's backward is one attention custom call with norm_eps and the raw q, k, and no
    l2norm backward call; the forward keeps the fused l2norm kernel."""
    import jax_cosine_attention as jca
    monkeypatch.setattr(_cuda, "fuses_norm_bwd", lambda head_dim, dtype: True)
    q = jnp.zeros((2, 64, 4, 64), jnp.bfloat16)
    k = jnp.zeros((2, 48, 2, 64), jnp.bfloat16)
    kl = jnp.full((2,), 40, jnp.int32)

    def loss(q, k, v, scale):
        out = jca.cosine_sim_attention(q, k, v, scale=scale, is_causal=True,
                                       key_value_seq_lengths=kl, eps=1e-5)
        return jnp.sum(out.astype(jnp.float32))

    scale = jnp.full((4,), 10.0, jnp.float32)
    txt = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, k, scale).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = _calls(txt)
    assert sorted(n for n, _ in calls) == ["jca_cosattn_bwd", "jca_cosattn_fwd"], txt[:2000]
    bwd = dict(calls)["jca_cosattn_bwd"]
    assert "norm_eps = 9.99999974E-6" in bwd or "norm_eps = 1.000000e-05" in bwd, bwd
    assert "jca_l2norm_fwd" in txt and "jca_l2norm_bwd" not in txt
    assert "tensor<2x4x64xf32>" in txt  # rowdot [B,N,T]


def test_unsupported_reasons(cuda_on):
    ok = _cuda.unsupported_reason((2, 8, 4, 64), (2, 8, 2, 64), (2, 8, 2, 64), jnp.bfloat16,
                                  (1, 4, 8, 8), jnp.float32, (2, 1, 1, 8))
    assert ok is None
    assert "head dim" in _cuda.unsupported_reason((1, 8, 1, 80), (1, 8, 1, 80), (1, 8, 1, 80),
                                                   jnp.float16)
    assert "dtype" in _cuda.unsupported_reason((1, 8, 1, 64), (1, 8, 1, 64), (1, 8, 1, 64),
                                                jnp.float32)
    assert _cuda.unsupported_reason((1, 8, 1, 64), (1, 8, 1, 64), (1, 8, 1, 32),
                                    jnp.float16) is not None
    assert "bias" in _cuda.unsupported_reason((2, 8, 4, 64), (2, 8, 2, 64), (2, 8, 2, 64),
                                              jnp.bfloat16, (3, 4, 8, 8), jnp.float32, None)


def test_unavailable_reports_reason(monkeypatch):
    monkeypatch.setattr(_cuda, "AVAILABLE", False)
    assert _cuda.unsupported_reason((1, 8, 1, 64), (1, 8, 1, 64), (1, 8, 1, 64),
                                    jnp.bfloat16) is not None
