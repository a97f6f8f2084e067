"""Runs the fused fwd + bwd once per config (after a warm-up) for `ncu` profiling:
ncu --kernel-name regex:'fwd_kernel|dq_kernel|dkdv_kernel' --launch-skip 3 --launch-count 3 ...
  python -P benchmarks/profile_kernels.py D [plain|fused|cudnn] [N]
`fused`: the opt-in 5-product backward (dQ reduced in the dK/dV kernel); `cudnn`: the same step
through cuDNN's flash attention on the l2-normalised q, k (the benchmark's baseline), for
profiling its kernels. N: sequence length (default 4096).
"""
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_cosine_attention import _cuda  # noqa: E402

D = int(sys.argv[1]) if len(sys.argv) > 1 else 64
PATH = sys.argv[2] if len(sys.argv) > 2 else "plain"
assert PATH in ("plain", "fused", "cudnn"), PATH
B, N, T = 4, 16, int(sys.argv[3]) if len(sys.argv) > 3 else 4096
rng = np.random.default_rng(0)
q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, N, D), np.float32), jnp.bfloat16) for _ in range(4))
q = (q / jnp.linalg.norm(q.astype(jnp.float32), axis=-1, keepdims=True)).astype(jnp.bfloat16)
k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(jnp.bfloat16)
sc = jnp.full((N,), 10.0, jnp.float32)


def cudnn_step(q, k, v, do):
    def loss(q, k, v):
        o = jax.nn.dot_product_attention(q, k, v, scale=10.0, implementation="cudnn")
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@jax.jit
def f(q, k, v, do):
    if PATH == "cudnn":
        return cudnn_step(q, k, v, do)
    o, lse = _cuda.fwd(q, k, v, sc, None, None, None, None, causal=False, groups=1, bounded=True)
    return _cuda.bwd(do, q, k, v, o, lse, sc, None, None, None, None, causal=False, groups=1,
                     bounded=True, need_dbias=False, deterministic=False,
                     fused_dq=PATH == "fused")[:3]


for _ in range(3):
    jax.block_until_ready(f(q, k, v, do))
print("profile run done")
