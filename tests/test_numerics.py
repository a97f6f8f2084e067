"""Forward and gradients of every path against the float64 oracle, on fresh random inputs."""

import numpy as np
import jax.numpy as jnp
import pytest

from oracle import IMPLEMENTATIONS, check_against_oracle

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def qkv(rng, B=2, T=45, S=37, N=4, K=2, H=32, Hv=None):
    return dict(query=rng.normal(size=(B, T, N, H)), key=rng.normal(size=(B, S, K, H)),
                value=rng.normal(size=(B, S, K, Hv or H)))


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    return request.param


@pytest.mark.parametrize("T,S", [(29, 61), (45, 45), (61, 29)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_causal_lengths_gqa(rng, impl, T, S, is_causal):
    check_against_oracle(rng, F32, diff=qkv(rng, T=T, S=S, N=4, K=2),
                         static=dict(is_causal=is_causal), implementation=impl)


@pytest.mark.parametrize("N,K,H,Hv", [(4, 1, 32, 32), (6, 3, 32, 16), (2, 2, 16, 48)])
def test_mqa_gqa_value_dim(rng, impl, N, K, H, Hv):
    check_against_oracle(rng, F32, diff=qkv(rng, N=N, K=K, H=H, Hv=Hv),
                         static=dict(is_causal=True), implementation=impl)


@pytest.mark.parametrize("groups", [2, 4])
def test_groups_and_per_head_scale(rng, impl, groups):
    diff = qkv(rng) | dict(scale=rng.uniform(2, 20, size=4))
    check_against_oracle(rng, F32, diff=diff, static=dict(groups=groups), implementation=impl)


def test_scalar_array_scale(rng, impl):
    check_against_oracle(rng, F32, diff=qkv(rng) | dict(scale=np.float32(7.5)), static={},
                         implementation=impl)


@pytest.mark.parametrize("bias_shape", ["NTS", "1NTS", "B1TS", "BNTS", "11TS", "BN1S"])
def test_bias_shapes(rng, impl, bias_shape):
    B, T, S, N = 2, 45, 37, 4
    sizes = dict(B=B, N=N, T=T, S=S, **{"1": 1})
    shape = tuple(sizes[c] for c in bias_shape)
    diff = qkv(rng, B=B, T=T, S=S, N=N) | dict(bias=3 * rng.normal(size=shape))
    check_against_oracle(rng, F32, diff=diff, static=dict(is_causal=True), implementation=impl)


@pytest.mark.parametrize("kind", ["key_padding", "dense", "shared_dense", "lengths"])
def test_masks_and_lengths(rng, impl, kind):
    B, T, S, N = 2, 45, 37, 4
    static = {}
    if kind == "key_padding":
        static["mask"] = rng.uniform(size=(B, 1, 1, S)) < 0.7
    elif kind == "dense":
        static["mask"] = rng.uniform(size=(B, N, T, S)) < 0.6
    elif kind == "shared_dense":
        static["mask"] = rng.uniform(size=(1, 1, T, S)) < 0.6
    else:
        static["query_seq_lengths"] = jnp.array([T, 17], jnp.int32)
        static["key_value_seq_lengths"] = jnp.array([9, S], jnp.int32)
    check_against_oracle(rng, F32, diff=qkv(rng, B=B, T=T, S=S, N=N), static=static,
                         implementation=impl)


def test_empty_rows_output_zero_with_finite_grads(rng, impl):
    B, T, S, N = 2, 40, 24, 2
    mask = rng.uniform(size=(B, 1, T, S)) < 0.5
    mask[:, :, 3] = False  # row 3 has no key at all
    static = dict(mask=mask, is_causal=True, query_seq_lengths=jnp.array([T, 30], jnp.int32))
    out, grads = check_against_oracle(rng, F32, diff=qkv(rng, B=B, T=T, S=S, N=N, K=2),
                                      static=static, implementation=impl)
    out = np.asarray(out)
    assert np.all(out[:, :T - S] == 0)  # causal with T > S: the first T - S rows see nothing
    assert np.all(out[:, 3] == 0) and np.all(out[1, 30:] == 0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_dtypes(rng, impl, dtype, is_causal):
    diff = qkv(rng, N=4, K=2) | dict(bias=rng.normal(size=(1, 4, 45, 37)))
    check_against_oracle(rng, dtype, diff=diff, static=dict(is_causal=is_causal),
                         implementation=impl)


@pytest.mark.parametrize("H", [16, 32, 64, 96, 128])
def test_head_dims_ragged_lengths(rng, impl, H):
    check_against_oracle(rng, BF16, diff=qkv(rng, T=53, S=71, H=H), static=dict(is_causal=True),
                         implementation=impl)


def test_f16_all_negative_cosines_is_weighted_mean(rng, impl):
    """The seed's kernel returned 0 rows when every cosine was negative (fp16 underflow)."""
    data = qkv(rng, B=1, T=16, S=24, N=2, K=2, H=32)
    data["key"] = -np.abs(data["key"])
    data["query"] = np.abs(data["query"])  # every <q, k> < 0
    out, _ = check_against_oracle(rng, F16, diff=data, static=dict(scale=20.0),
                                  implementation=impl)
    assert np.min(np.abs(np.asarray(out, np.float32))) >= 0 and np.any(np.asarray(out) != 0)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_huge_bias(rng, impl, dtype):
    # Softmax is then nearly one-hot: its gradients are rounding noise, so only their
    # finiteness is checked; the forward must be exact.
    diff = qkv(rng, T=21, S=30) | dict(bias=1e4 * rng.normal(size=(2, 4, 21, 30)))
    check_against_oracle(rng, dtype, diff=diff, static={}, implementation=impl, check_grads=False)


def test_very_negative_bias_row(rng, impl):
    bias = rng.normal(size=(1, 1, 21, 30))
    bias[..., 5, :] -= 1e4  # one row whose every logit is hugely negative: still a softmax
    check_against_oracle(rng, F32, diff=qkv(rng, T=21, S=30) | dict(bias=bias), static={},
                         implementation=impl)


def test_unbatched(rng, impl):
    data = {n: x[0] for n, x in qkv(rng).items()}
    check_against_oracle(rng, F32, diff=data | dict(bias=rng.normal(size=(4, 45, 37))),
                         static=dict(is_causal=True), implementation=impl)


def test_prenormalised_inputs(rng, impl):
    from jax_cosine_attention import l2norm
    data = qkv(rng)
    data["query"] = np.asarray(l2norm(jnp.asarray(data["query"]), 2))
    check_against_oracle(rng, F32, diff=data, static=dict(l2norm_qk=False, scale=4.0),
                         implementation=impl)


def test_bias_not_differentiated(rng, impl):
    """A bias outside the differentiated inputs skips its gradient; the others stay exact."""
    bias = 2 * rng.normal(size=(1, 4, 45, 37))
    check_against_oracle(rng, F32, diff=qkv(rng), static=dict(bias=jnp.asarray(bias, jnp.float32),
                                                               is_causal=True), implementation=impl)
