"""A/B of the public op's fwd+bwd with the l2norm backward fused into the sm_90a kernels
(JCA_FUSED_NORM_BWD=1, the default) against the separate l2norm backward kernels (=0), both
traced in one process and timed alternately (ABAB...), fresh inputs per config, median ms.
Prints one JSON line per config. Usage: python -P benchmarks/ab_fused_norm.py [--reps 12]
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_cosine_attention as jca  # noqa: E402


def step_fn(fused, causal, q, k, v):
    """The compiled fwd+bwd step, traced here while JCA_FUSED_NORM_BWD is set (it is read at
    trace time, so the jit must be lowered now, not at its first call)."""
    os.environ["JCA_FUSED_NORM_BWD"] = "1" if fused else "0"

    def loss(q, k, v):
        out = jca.cosine_sim_attention(q, k, v, is_causal=causal, implementation="cuda")
        return jnp.sum(out.astype(jnp.float32))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    assert ("jca_l2norm_bwd" in compiled.as_text()) != fused  # the setting took effect
    return compiled


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    B, H = 4, 16
    for causal in (False, True):
        for D in a.dims:
            for N in a.seqs:
                q, k, v = (jnp.asarray(rng.standard_normal((B, N, H, D)), jnp.bfloat16)
                           for _ in range(3))
                fns = {f: step_fn(f, causal, q, k, v) for f in (True, False)}
                for f in fns.values():  # compile (each traced with its setting), warm up
                    jax.block_until_ready(f(q, k, v))
                    jax.block_until_ready(f(q, k, v))
                times = {True: [], False: []}
                for _ in range(a.reps):
                    for fused in (True, False):
                        t = time.perf_counter()
                        jax.block_until_ready(fns[fused](q, k, v))
                        times[fused].append(time.perf_counter() - t)
                ms = {f: statistics.median(t) * 1e3 for f, t in times.items()}
                print(json.dumps(dict(D=D, N=N, causal=causal, fused_ms=round(ms[True], 4),
                                      unfused_ms=round(ms[False], 4),
                                      speedup=round(ms[False] / ms[True], 4))), flush=True)
    os.environ.pop("JCA_FUSED_NORM_BWD")


if __name__ == "__main__":
    main()
