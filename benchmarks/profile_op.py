"""One fwd+bwd (jax.grad of sum(out * do)) of a path of benchmarks/bench.py, for `ncu`:

  python benchmarks/profile_op.py PATH D [--causal] [--n 4096] [--iters 3]

Runs `iters` identical steps after compiling; every kernel of every step is in ncu's report, and
the steps are delimited by a tiny marker kernel (a 1-element add) so the report can be split.
"""
import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("path")
ap.add_argument("D", type=int)
ap.add_argument("--causal", action="store_true")
ap.add_argument("--n", type=int, default=4096)
ap.add_argument("--iters", type=int, default=3)
a = ap.parse_args()
B, H = 4, 16
rng = np.random.default_rng(0)
q, k, v, do = (jnp.asarray(rng.standard_normal((B, a.n, H, a.D), np.float32), jnp.bfloat16)
               for _ in range(4))
if a.path.startswith("kernel"):
    q, k = bench.l2n(q), bench.l2n(k)
fn = bench.make_fn(a.path, "fwd+bwd", a.causal)
marker = jax.jit(lambda x: x + 1)
x = jnp.zeros((1,), jnp.float32)
jax.block_until_ready(fn(q, k, v, do))
for _ in range(a.iters):
    x = jax.block_until_ready(marker(x))
    jax.block_until_ready(fn(q, k, v, do))
print("profile_op done", a.path, a.D, a.causal, a.n)
