"""Fused l2 normalisation of q and k for the CUDA path (`cuda/l2norm_kernel.cu`).

XLA runs `normalize.l2norm` as two kernels per tensor (a reduce reading x, then a fusion reading
x again and writing x̂) and its backward as three; the CUDA kernels take one pass each: the
forward reads x and writes x̂, the backward reads x and dy and writes dx. Same function and same
derivative as jax autodiff of `normalize.l2norm` (see `cuda/l2norm.h`).

    l2norm                 custom_vjp (the backward recomputes from x, its only residual)
      custom_vmap          a vmapped axis becomes one more leading (row) dim
        custom_partitioning    Shardy rule "... h -> ... h": leading dims keep their sharding
                               (batch, sequence, heads: no collectives), h is replicated
          platform_dependent   cuda = jca_l2norm_fwd / jca_l2norm_bwd FFI kernels,
                               default = normalize.l2norm / its XLA vjp

`l2norm` falls back to `normalize.l2norm` for what the kernel does not serve (`kernel_supports`:
dtype, head dim, group size). The public pure-JAX function stays `normalize.l2norm`.
JCA_FUSED_L2NORM=0 (read when a call is traced) keeps the public op on the XLA l2norm (A/B).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from . import _cuda
from .normalize import DEFAULT_EPS
from .normalize import l2norm as xla_l2norm

FWD_TARGET = "jca_l2norm_fwd"
BWD_TARGET = "jca_l2norm_bwd"
DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def enabled():
    """Whether the public op's CUDA path uses this op (JCA_FUSED_L2NORM=0: XLA's l2norm)."""
    return os.environ.get("JCA_FUSED_L2NORM", "1") != "0"


def kernel_supports(h, groups, dtype):
    """Whether the CUDA kernels serve rows of `h` elements in `groups` groups of this dtype.

    Mirrors jca::L2NormSupported (cuda/l2norm_kernel.cu): h % 8 == 0 and h <= 256, or h <= 512
    with h % 16 == 0, or h <= 1024 with h % 32 == 0; the group size h / groups is a multiple or a
    divisor of the 8 * (1, 2, 4) elements one thread holds.
    """
    h, groups = int(h), int(groups)
    if np.dtype(dtype) not in DTYPES:
        return False
    if h <= 0 or h % 8 or groups < 1 or h % groups:
        return False
    if h > 1024 or (h > 512 and h % 32) or (h > 256 and h % 16):
        return False
    e = 8 * (1 if h <= 256 else 2 if h <= 512 else 4)
    gsize = h // groups
    return gsize % e == 0 or e % gsize == 0


def l2norm(x, groups: int = 1, eps: float = DEFAULT_EPS):
    """`normalize.l2norm` through the fused kernels where they serve x (CUDA devices; the XLA
    computation elsewhere, via `lax.platform_dependent`), else `normalize.l2norm` itself."""
    x = jnp.asarray(x)
    if not isinstance(groups, int) or groups < 1 or x.ndim < 1 or x.shape[-1] % groups:
        return xla_l2norm(x, groups, eps)  # raises the public function's errors
    if not kernel_supports(x.shape[-1], groups, x.dtype):
        return xla_l2norm(x, groups, eps)
    return _l2norm(x, int(groups), float(eps))


# ---------------------------------------------------------------- per-device compute

def _ffi_fwd(x, *, groups, eps):
    call = jax.ffi.ffi_call(FWD_TARGET, jax.typeof(x), vmap_method="broadcast_all")
    return call(x, groups=np.int64(groups), eps=np.float32(eps))


def _ffi_bwd(x, dy, *, groups, eps):
    call = jax.ffi.ffi_call(BWD_TARGET, jax.typeof(x), vmap_method="broadcast_all")
    return call(x, dy.astype(x.dtype), groups=np.int64(groups), eps=np.float32(eps))


def xla_bwd(x, dy, *, groups, eps):
    _, vjp = jax.vjp(lambda x: xla_l2norm(x, groups, eps), x)
    return vjp(dy.astype(x.dtype))[0]


def _local_fwd(groups, eps, x):
    xla = functools.partial(xla_l2norm, groups=groups, eps=eps)
    if not _cuda.AVAILABLE:  # (read when traced) no kernel to lower to on any platform
        return xla(x)
    return jax.lax.platform_dependent(
        x, cuda=functools.partial(_ffi_fwd, groups=groups, eps=eps), default=xla)


def _local_bwd(groups, eps, x, dy):
    xla = functools.partial(xla_bwd, groups=groups, eps=eps)
    if not _cuda.AVAILABLE:
        return xla(x, dy)
    return jax.lax.platform_dependent(
        x, dy, cuda=functools.partial(_ffi_bwd, groups=groups, eps=eps), default=xla)


# ---------------------------------------------------------------- sharding

def _rows_sharding(mesh, sharding, ndim):
    """x's sharding with the last (normalised) dim replicated; other dims keep their axes."""
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    spec = (spec + (None,) * ndim)[:ndim]
    return NamedSharding(mesh, P(*spec[:-1], None))


def _meshless(fn):
    """The per-device body must not pick up the user's (possibly Explicit) mesh while traced."""
    def run(*args):
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
            return fn(*args)
    return run


def _partition(body, mesh, arg_shapes, result_shape):
    x = arg_shapes[0]
    s = _rows_sharding(mesh, x.sharding, len(x.shape))
    return mesh, _meshless(body), s, (s,) * len(arg_shapes)


def _infer(mesh, arg_shapes, result_shape):
    x = arg_shapes[0]
    return _rows_sharding(mesh, x.sharding, len(x.shape))


@functools.lru_cache(maxsize=None)
def _partitioned(kind, groups, eps):
    if kind == "fwd":
        body, rule = functools.partial(_local_fwd, groups, eps), "... h -> ... h"
    else:
        body, rule = functools.partial(_local_bwd, groups, eps), "... h, ... h -> ... h"
    op = custom_partitioning(body)
    op.def_partition(partition=functools.partial(_partition, body),
                     infer_sharding_from_operands=_infer, sharding_rule=rule,
                     need_replication_factors=("h",))
    return op


# ---------------------------------------------------------------- batching

@functools.lru_cache(maxsize=None)
def _batched(kind, groups, eps):
    sharded = _partitioned(kind, groups, eps)

    @jax.custom_batching.custom_vmap
    def op(*arrays):
        return sharded(*arrays)

    @op.def_vmap
    def rule(axis_size, in_batched, *arrays):
        # Row-wise op: the vmapped axis (leading, as custom_vmap hands it over) is one more row
        # dim; an unbatched operand of the backward is broadcast to it.
        arrays = tuple(a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                       for a, b in zip(arrays, in_batched))
        return op(*arrays), True

    return op


# ---------------------------------------------------------------- differentiation


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _l2norm(x, groups, eps):
    return _batched("fwd", groups, eps)(x)


def _l2norm_fwd(x, groups, eps):
    return _batched("fwd", groups, eps)(x), x


def _l2norm_bwd(groups, eps, x, dy):
    return (_batched("bwd", groups, eps)(x, dy.astype(x.dtype)),)


_l2norm.defvjp(_l2norm_fwd, _l2norm_bwd)
