"""The l2 normalisation that cosine-sim attention applies to queries and keys."""

import jax.numpy as jnp

DEFAULT_EPS = 1e-12  # as torch.nn.functional.normalize, which the seed library used


def l2norm(x, groups: int = 1, eps: float = DEFAULT_EPS):
    """Divides each of `groups` equal chunks of the last axis by max(‖chunk‖, eps).

    Computed in float32 (float64 for float64 input) and returned in x's dtype. Apply it yourself
    and pass `l2norm_qk=False` to `cosine_sim_attention` when something (e.g. rotary embeddings)
    must sit between the normalisation and the attention.
    """
    x = jnp.asarray(x)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"l2norm: groups must be a positive int, got {groups!r}")
    dim = x.shape[-1]
    if dim % groups:
        raise ValueError(f"l2norm: groups={groups} does not divide the last dim {dim} of shape {x.shape}")
    compute = jnp.promote_types(x.dtype, jnp.float32)
    xg = x.astype(compute).reshape(*x.shape[:-1], groups, dim // groups)
    sumsq = jnp.sum(xg * xg, axis=-1, keepdims=True)
    # max(sumsq, eps²) before the sqrt == max(‖x‖, eps), and keeps the gradient finite at x = 0.
    norm = jnp.sqrt(jnp.maximum(sumsq, jnp.asarray(eps, compute) ** 2))
    return (xg / norm).reshape(x.shape).astype(x.dtype)
