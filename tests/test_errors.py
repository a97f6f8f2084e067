"""Bad input raises a clear error naming the argument, before any compute."""

import numpy as np
import jax.numpy as jnp
import pytest

from jax_cosine_attention import cosine_sim_attention, l2norm

B, T, S, N, K, H = 2, 8, 6, 4, 2, 16


def ok():
    return dict(query=jnp.ones((B, T, N, H)), key=jnp.ones((B, S, K, H)), value=jnp.ones((B, S, K, H)))


CASES = {
    "rank": (dict(query=jnp.ones((T, N, H, 1, 1))), ValueError, "rank"),
    "mixed rank": (dict(key=jnp.ones((S, K, H))), ValueError, "rank"),
    "head dims": (dict(key=jnp.ones((B, S, K, 8)), value=jnp.ones((B, S, K, 8))), ValueError, "head dims"),
    "kv length": (dict(value=jnp.ones((B, S + 1, K, H))), ValueError, "key and value"),
    "kv batch": (dict(value=jnp.ones((B + 1, S, K, H))), ValueError, "key and value"),
    "q/k batch": (dict(key=jnp.ones((B + 1, S, K, H)), value=jnp.ones((B + 1, S, K, H))), ValueError, "batch"),
    "heads": (dict(key=jnp.ones((B, S, 3, H)), value=jnp.ones((B, S, 3, H))), ValueError, "multiple"),
    "groups": (dict(groups=3), ValueError, "groups"),
    "groups type": (dict(groups=1.5), ValueError, "groups"),
    "mask dtype": (dict(mask=jnp.ones((B, 1, 1, S))), TypeError, "mask"),
    "mask shape": (dict(mask=jnp.ones((B, 1, 1, S + 1), bool)), ValueError, "mask"),
    "mask rank": (dict(mask=jnp.ones((1, B, 1, 1, S), bool)), ValueError, "mask"),
    "bias shape": (dict(bias=jnp.ones((B, 3, T, S))), ValueError, "bias"),
    "bias dtype": (dict(bias=jnp.ones((B, N, T, S), jnp.int32)), TypeError, "bias"),
    "scale shape": (dict(scale=jnp.ones((N + 1,))), ValueError, "scale"),
    "scale rank": (dict(scale=jnp.ones((1, N))), ValueError, "scale"),
    "dtype mix": (dict(key=jnp.ones((B, S, K, H), jnp.bfloat16)), TypeError, "dtypes differ"),
    "dtype": (dict(query=np.ones((B, T, N, H), np.float64), key=np.ones((B, S, K, H), np.float64),
                   value=np.ones((B, S, K, H), np.float64)), TypeError, "not supported"),
    "int dtype": (dict(query=jnp.ones((B, T, N, H), jnp.int32), key=jnp.ones((B, S, K, H), jnp.int32),
                       value=jnp.ones((B, S, K, H), jnp.int32)), TypeError, "not supported"),
    "implementation": (dict(implementation="triton"), ValueError, "implementation"),
    "lengths shape": (dict(query_seq_lengths=jnp.ones((B + 1,), jnp.int32)), ValueError, "query_seq_lengths"),
    "lengths dtype": (dict(key_value_seq_lengths=jnp.ones((B,))), TypeError, "key_value_seq_lengths"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises(case):
    changes, error, words = CASES[case]
    with pytest.raises(error, match=words):
        cosine_sim_attention(**(ok() | changes))


def test_message_names_shapes():
    with pytest.raises(ValueError, match=r"key\(2, 6, 2, 8\)"):
        cosine_sim_attention(**(ok() | dict(key=jnp.ones((B, S, K, 8)))))


def test_cuda_without_kernel_or_gpu_raises():
    from jax_cosine_attention import _cuda
    import jax
    if _cuda.AVAILABLE and jax.default_backend() == "gpu":
        pytest.skip("a GPU and the kernel are present")
    with pytest.raises(ValueError, match="implementation='cuda'"):
        cosine_sim_attention(**ok(), implementation="cuda")


def test_l2norm_errors():
    with pytest.raises(ValueError, match="groups"):
        l2norm(jnp.ones((3, 10)), groups=3)
