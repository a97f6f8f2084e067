"""Float64 oracle: the dense reference and its gradients, computed with x64 enabled."""

import contextlib

import numpy as np
import jax
import jax.numpy as jnp

from jax_cosine_attention import _cuda, cosine_sim_attention, cosine_sim_attention_reference


def _has_gpu():
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


# Every CPU oracle test runs again through the fused kernel where a GPU and the extension exist.
IMPLEMENTATIONS = ["xla"] + (["cuda"] if _has_gpu() and _cuda.AVAILABLE else [])

TOLERANCE = {jnp.dtype(jnp.float32): 2e-4, jnp.dtype(jnp.bfloat16): 3e-2,
             jnp.dtype(jnp.float16): 4e-3}


def x64():
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older jax
    return enable_x64()


def _loss_and_grads(fn, diff, cotangent):
    names = list(diff)

    def loss(*xs):
        out = fn(**dict(zip(names, xs)))
        return jnp.sum(out.astype(cotangent.dtype) * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True)(
        *diff.values())
    return out, dict(zip(names, grads))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite values"
    denom = np.linalg.norm(b)
    return np.linalg.norm(a - b) / (denom if denom > 0 else 1.0)


def _logit_range_factor(dtype, diff, static):
    """bf16/f16 round q̂ and k̂ (relative 2^-9 / 2^-12) before the dot product, so logit errors
    grow with the logit range scale·groups; tolerances are calibrated at the default 10."""
    if dtype == jnp.float32:
        return 1.0
    scale = diff.get("scale", static.get("scale", 10.0))
    bound = float(np.max(np.abs(np.asarray(scale)))) * static.get("groups", 1)
    return max(1.0, bound / 10.0)


def _kernel_dtype(dtype, diff, static):
    """The kernel computes in bf16/f16 (f32 goes to the XLA path): run f32 cases in bf16, and
    skip configurations it does not serve (the XLA path covers those)."""
    import pytest
    from jax_cosine_attention import _checks
    if dtype == jnp.float32:
        dtype = jnp.dtype(jnp.bfloat16)
    c = _checks.canonicalize(*(jnp.asarray(diff[n], dtype) for n in ("query", "key", "value")),
                             diff.get("bias"), static.get("mask"), scale=1.0, groups=1,
                             query_seq_lengths=None, key_value_seq_lengths=None,
                             implementation=None)
    reason = _cuda.unsupported_reason(c.q.shape, c.k.shape, c.v.shape, c.q.dtype,
                                      None if c.bias is None else c.bias.shape, jnp.float32,
                                      None if c.mask is None else c.mask.shape)
    if reason:
        pytest.skip(f"kernel does not serve this case: {reason}")
    return dtype


def check_against_oracle(rng, dtype, *, diff, static, implementation="xla", tol=None,
                         check_grads=True):
    """Compares forward and gradients of every array in `diff` with the float64 reference.

    `diff` holds differentiable inputs (query, key, value, and optionally bias, scale); `static`
    the rest (mask, lengths, flags). Inputs in `diff` are cast to `dtype` (bias and scale stay
    float32) for the tested path and to float64 for the oracle.
    """
    dtype = jnp.dtype(dtype)
    if implementation == "cuda":
        dtype = _kernel_dtype(dtype, diff, static)
    tol = tol or TOLERANCE[dtype] * _logit_range_factor(dtype, diff, static)
    cast = {n: (jnp.asarray(x, dtype) if n in ("query", "key", "value") else jnp.asarray(x, jnp.float32))
            for n, x in diff.items()}
    fn = lambda **kw: cosine_sim_attention(**kw, **static, implementation=implementation)
    probe = jax.eval_shape(lambda: fn(**cast))
    cot = rng.normal(size=probe.shape)
    out, grads = jax.jit(lambda c, d: _loss_and_grads(fn, d, c))(jnp.asarray(cot, jnp.float32), cast)
    with x64():
        ref_diff = {n: jnp.asarray(np.asarray(x, np.float64)) for n, x in cast.items()}
        ref_fn = lambda **kw: cosine_sim_attention_reference(**kw, **static)
        ref_out, ref_grads = _loss_and_grads(ref_fn, ref_diff, jnp.asarray(cot, jnp.float64))
        ref_out, ref_grads = np.asarray(ref_out), {n: np.asarray(g) for n, g in ref_grads.items()}
    assert out.dtype == dtype
    errors = {"out": rel_err(out, ref_out)}
    if check_grads:
        errors.update({f"d{n}": rel_err(grads[n], ref_grads[n]) for n in grads})
    else:
        assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads.values())
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errors})"
    return out, grads
