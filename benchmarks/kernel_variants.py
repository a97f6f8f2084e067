"""A/B of kernel variants selected by an environment variable the launcher reads once
per process (`--env`): a temporary knob added to the launcher for the experiment (sessions 3-5
of benchmarks/NOTES.md used JCA_SM90_BWD_VARIANT, JCA_SM90_EXP_EMU, JCA_SM80_VARIANT,
JCA_SM80_DKDV_DQ and JCA_SM80_FWD_SPLIT, sessions 6-8 JCA_EXP; none is in the tree now).

For each head dim: the variant's outputs (`--pass fwd`: o and lse; `bwd`: dq, dk, dv) against
the other architecture's kernels on the same inputs (`--sm80`: the variant is a portable kernel,
checked against the sm_90a one) (max abs difference relative to the largest magnitude),
then the median time of the raw FFI call (B=4, H=16, N given, bf16; three input sets per
dispatch, time / 3).
Prints one JSON line per config.
Usage: KNOB=2 python -P benchmarks/kernel_variants.py --pass fwd --env KNOB
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jax_cosine_attention import _cuda  # noqa: E402


class Keys:
    """Fresh jax.random keys: inputs drawn on the device (numpy's generator took ≈ 10 s of each
    run at N=16384, three sets of four [4, 16384, 16, D] arrays)."""

    def __init__(self, seed):
        self.key = jax.random.PRNGKey(seed)

    def __call__(self):
        self.key, key = jax.random.split(self.key)
        return key


def inputs(keys, B, T, N, D):
    def nrm(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k, v, do = (jax.random.normal(keys(), (B, T, N, D), jnp.float32) for _ in range(4))
    return tuple(x.astype(jnp.bfloat16) for x in (nrm(q), nrm(k), v, do))


def make_bwd(causal, sm90):
    @jax.jit
    def run(q, k, v, do, o, lse, sc):
        return _cuda.bwd(do, q, k, v, o, lse, sc, None, None, None, None, causal=causal, groups=1,
                         bounded=True, need_dbias=False, deterministic=False, sm90=sm90)[:3]
    return run


def make_fwd(causal, sm90):
    @jax.jit
    def run(q, k, v, do, o, lse, sc):
        del do, o, lse
        return _cuda.fwd(q, k, v, sc, None, None, None, None, causal=causal, groups=1,
                         bounded=True, sm90=sm90)
    return run


fwd = make_fwd(False, True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--pass", dest="which", choices=["fwd", "bwd"], default="bwd")
    ap.add_argument("--env", default="JCA_SM90_BWD_VARIANT")
    ap.add_argument("--causal", action="store_true", help="time causal calls")
    ap.add_argument("--sm80", action="store_true",
                    help="time the portable kernels (checked against the sm_90a ones)")
    a = ap.parse_args()
    tested = not a.sm80  # the sm90 flag of the variant's path; the other path is the reference
    variant = os.environ.get(a.env, "0")
    make = make_fwd if a.which == "fwd" else make_bwd
    keys = Keys(int(variant) + 1)
    for D in a.dims:
        # correctness on a small causal T != S problem against the sm_80 kernels
        B, T, N = 2, 700, 4
        q, k, v, do = inputs(keys, B, T, N, D)
        sc = jax.random.uniform(keys(), (N,), jnp.float32, 5.0, 15.0)
        o, lse = _cuda.fwd(q, k, v, sc, None, None, None, None, causal=True, groups=1,
                           bounded=True)
        got = make(True, tested)(q, k, v, do, o, lse, sc)
        want = make(True, not tested)(q, k, v, do, o, lse, sc)
        err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                        / (float(jnp.max(jnp.abs(w.astype(jnp.float32)))) + 1e-9))
                  for g, w in zip(got, want))
        finite = all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in got)
        for S in a.seqs:
            B, N = 4, 16
            sets = []
            sc = jnp.full((N,), 10.0, jnp.float32)
            for _ in range(3):
                q, k, v, do = inputs(keys, B, S, N, D)
                o, lse = fwd(q, k, v, None, None, None, sc)
                sets.append((q, k, v, do, o, lse, sc))
            run = make(a.causal, tested)
            # the three input sets in one dispatch: per-call launch overhead amortised
            run3 = jax.jit(lambda sets: [run(*s) for s in sets])
            jax.block_until_ready(run3(sets))
            times = []
            for i in range(a.reps):
                t = time.perf_counter()
                jax.block_until_ready(run3(sets))
                times.append((time.perf_counter() - t) / 3)
            ms = statistics.median(times) * 1e3
            flops = ((2.5 if a.which == "bwd" else 1.0) * 4 * B * N * S * S * D
                     / (2 if a.causal else 1))
            print(json.dumps(dict(env=a.env, variant=int(variant), D=D, N=S, causal=a.causal,
                                  ms=round(ms, 4),
                                  tflops=round(flops / ms / 1e9, 1), rel_err_vs_other=err,
                                  finite=finite)), flush=True)


if __name__ == "__main__":
    main()
