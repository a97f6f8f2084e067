"""Accuracy side of the f32 decision (issue 3: "f32 inputs either use TF32 tensor cores with a
documented error, or go to the XLA path"): the error a TF32 tensor-core kernel would have, against
a float64 oracle, next to the XLA path's (full f32) and the bf16 kernel's.

The kernel's arithmetic is emulated on the CPU: every GEMM operand is rounded the way the kernel
would feed it to the tensor cores (TF32: cvt.rna, 10 mantissa bits; bf16: round to nearest even),
products and sums in f32, softmax and the l2norm (and its backward) in f32. Same algorithm as the
kernels: S = scale q̂ k̂ᵀ, P with a fixed shift, O = (P V) / rowsum; backward delta = rowsum(dO O),
dP = dO Vᵀ, dS = P (dP - delta), dV = Pᵀ dO, dq̂ = scale dS k̂, dk̂ = scale dSᵀ q̂, then the l2norm
backward. The error is the oracle tests' (‖a - b‖ / ‖b‖, tests/oracle.py); their f32 tolerance is
2e-4. The f64 version of these formulas is checked against the library's reference first.

Usage: python benchmarks/tf32_error.py [--seqs 1024] [--dims 64 128]
"""
import argparse
import json

import numpy as np


def round_tf32(x):
    """f32 -> TF32 (round to nearest, ties away from zero, as cvt.rna.tf32.f32), kept in f32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def round_bf16(x):
    """f32 -> bf16 (round to nearest even), kept in f32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    bias = np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return ((u + bias) & np.uint32(0xFFFF0000)).view(np.float32)


ROUNDING = {"f32": lambda x: x, "tf32": round_tf32, "bf16": round_bf16}


def l2norm(x):
    n = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    return x / n, n


def l2norm_bwd(x, n, dy):
    """d/dx of x / |x| given dy (rows away from zero)."""
    return dy / n - x * np.sum(x * dy, axis=-1, keepdims=True) / n**3


def attention(q, k, v, do, scale, r, dtype):
    """Forward and backward with GEMM operands rounded by r; [H, T, D] inputs."""
    q, k, v, do = (x.astype(dtype) for x in (q, k, v, do))
    scale = dtype(scale)
    qh, qn = l2norm(q)
    kh, kn = l2norm(k)
    s = scale * (r(qh) @ np.swapaxes(r(kh), -1, -2))
    p = np.exp(s - scale)                         # fixed shift: |s| <= scale
    lsum = p.sum(-1, keepdims=True)
    o = (r(p) @ r(v)) / lsum
    pn = p / lsum                                 # normalised probabilities (the backward's P)
    delta = np.sum(do * o, axis=-1, keepdims=True)
    dp = r(do) @ np.swapaxes(r(v), -1, -2)
    ds = pn * (dp - delta)
    dv = np.swapaxes(r(pn), -1, -2) @ r(do)
    dqh = scale * (r(ds) @ r(kh))
    dkh = scale * (np.swapaxes(r(ds), -1, -2) @ r(qh))
    return o, l2norm_bwd(q, qn, dqh), l2norm_bwd(k, kn, dkh), dv


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_formulas(rng):
    """The f64 formulas above against the library's reference (jax, float64, jax.grad)."""
    import jax
    import jax.numpy as jnp
    from jax_cosine_attention import reference
    H, T, D = 2, 64, 32
    q, k, v, do = (rng.standard_normal((H, T, D)) for _ in range(4))
    want = attention(q, k, v, do, 10.0, lambda x: x, np.float64)
    if hasattr(jax, "enable_x64"):
        x64 = jax.enable_x64(True)
    else:  # older jax
        from jax.experimental import enable_x64
        x64 = enable_x64()
    with x64:
        def loss(q, k, v):
            o = reference.cosine_sim_attention_reference(q[None], k[None], v[None], scale=10.0)
            return jnp.sum(o[0] * do.transpose(1, 0, 2)), o
        t = lambda x: jnp.asarray(x.transpose(1, 0, 2))  # [H,T,D] -> [T,H,D]
        (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(t(q), t(k), t(v))
        got = [np.asarray(o[0]).transpose(1, 0, 2)] + [np.asarray(x).transpose(1, 0, 2) for x in g]
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    assert max(errs) < 1e-10, f"formulas disagree with the reference: {errs}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--scale", type=float, default=10.0)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    check_formulas(rng)
    for D in a.dims:
        for N in a.seqs:
            q, k, v, do = (rng.standard_normal((a.heads, N, D)) for _ in range(4))
            oracle = attention(q, k, v, do, a.scale, lambda x: x, np.float64)
            for name, r in ROUNDING.items():
                got = attention(q, k, v, do, a.scale, r, np.float32)
                errs = {n: round(rel_err(g, w), 8)
                        for n, g, w in zip(("o", "dq", "dk", "dv"), got, oracle)}
                print(json.dumps(dict(D=D, N=N, scale=a.scale, arithmetic=name, **errs)),
                      flush=True)


if __name__ == "__main__":
    main()
