"""`python -m jax_cosine_attention`: self-check and mini-benchmark on whatever device is present.

Every available path (dense reference, blockwise XLA, fused CUDA kernel) runs forward and
forward+backward on the same fresh random inputs; errors are relative to the reference
computed in float32, timings are medians after warm-up.
"""

import argparse
import statistics
import time

import numpy as np
import jax
import jax.numpy as jnp

from . import _cuda, cosine_sim_attention, cosine_sim_attention_reference


def _parse():
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(prog="python -m jax_cosine_attention", description=__doc__)
    p.add_argument("--batch", type=int, default=4 if on_gpu else 1)
    p.add_argument("--seq", type=int, default=2048 if on_gpu else 512)
    p.add_argument("--heads", type=int, default=16 if on_gpu else 4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   default="bfloat16" if on_gpu else "float32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeats", type=int, default=20 if on_gpu else 5)
    return p.parse_args()


def _median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    args = _parse()
    dtype = jnp.dtype(args.dtype)
    B, T, N, H = args.batch, args.seq, args.heads, args.head_dim
    rng = np.random.default_rng()
    q, k, v, do = (jnp.asarray(rng.normal(size=(B, T, N, H)), dtype) for _ in range(4))
    opts = dict(is_causal=args.causal)

    paths = {"reference": lambda q, k, v: cosine_sim_attention_reference(q, k, v, **opts),
             "xla": lambda q, k, v: cosine_sim_attention(q, k, v, implementation="xla", **opts)}
    if _cuda.AVAILABLE and jax.default_backend() == "gpu":
        paths["cuda"] = lambda q, k, v: cosine_sim_attention(q, k, v, implementation="cuda", **opts)

    def fwd_bwd(f):
        def run(q, k, v):
            out, vjp = jax.vjp(f, q, k, v)
            return out, vjp(do)
        return jax.jit(run)

    f32 = lambda x: x.astype(jnp.float32)
    want_out, want_grads = fwd_bwd(paths["reference"])(f32(q), f32(k), f32(v))
    flops = 4 * B * N * T * T * H / (2 if args.causal else 1)

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"CUDA extension: {'yes' if _cuda.AVAILABLE else 'no (' + str(_cuda.IMPORT_ERROR) + ')'}")
    print(f"B={B} T=S={T} heads={N} head_dim={H} {dtype.name} causal={args.causal}")
    header = f"{'path':<10} {'out err':>9} {'grad err':>9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd TFLOP/s':>12}"
    print(header)
    print("-" * len(header))
    failed = False
    for name, f in paths.items():
        out, grads = fwd_bwd(f)(q, k, v)
        out_err = _rel_err(out, want_out)
        grad_err = max(_rel_err(g, w) for g, w in zip(grads, want_grads))
        fwd_ms = _median_ms(jax.jit(f), (q, k, v), args.repeats)
        both_ms = _median_ms(fwd_bwd(f), (q, k, v), args.repeats)
        tol = 1e-3 if dtype == jnp.float32 else 5e-2
        failed |= not (out_err < tol and grad_err < tol)
        print(f"{name:<10} {out_err:>9.2e} {grad_err:>9.2e} {fwd_ms:>9.3f} {both_ms:>11.3f} "
              f"{flops / fwd_ms / 1e9:>12.2f}")
    print("self-check:", "FAILED" if failed else "ok")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
