"""Run in a subprocess with 4 host CPU devices (see test_l2norm_op.py): the fused l2norm's op
stack (custom_vjp -> custom_vmap -> custom_partitioning -> platform_dependent, with the CUDA
branch traced: `_cuda.AVAILABLE` is forced on, the CPU lowers the XLA branch) keeps leading dims
sharded without collectives, under jit on Auto and Explicit meshes and under shard_map, and the
public op through the fused path (jit with sharded q/k/v, and sharded_cosine_sim_attention)
equals the unsharded result."""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_cosine_attention as jca
from jax_cosine_attention import _cuda, _l2norm_op, _xla, normalize

_cuda.AVAILABLE, _cuda.IMPORT_ERROR = True, None
_xla.BLOCK_SIZES = (16, 16)
COLLECTIVES = re.compile(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter")


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def _max_err(got, want):
    return max(float(np.max(np.abs(_f32(g) - _f32(w)))) for g, w in zip(got, want))


def _spec3(spec):
    return (tuple(spec) + (None,) * 4)[:3]


def run_op(axis_type):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 8, 4, 64)), jnp.bfloat16)
    ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    loss = lambda fn: (lambda x: jnp.sum(fn(x, 2).astype(jnp.float32) * ct))
    want = [normalize.l2norm(x, 2), jax.grad(loss(normalize.l2norm))(x)]
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    report = {}
    with jax.set_mesh(mesh):
        for name, spec in (("batch_heads", P("data", None, "model", None)),
                           ("seq_heads", P(None, "data", "model", None)),
                           ("batch_seq", P("data", "model"))):
            xs = jax.device_put(x, NamedSharding(mesh, spec))
            fwd = jax.jit(lambda x: _l2norm_op.l2norm(x, 2)).lower(xs).compile()
            grad = jax.jit(jax.grad(loss(_l2norm_op.l2norm))).lower(xs).compile()
            got = [fwd(xs), grad(xs)]
            report[name] = dict(
                collectives=sorted(set(COLLECTIVES.findall(fwd.as_text() + grad.as_text()))),
                max_err=_max_err(got, want),
                out_spec=[str(_spec3(g.sharding.spec)) for g in got],
                in_spec=str(_spec3(spec)))
    return report


def run_shard_map():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 8, 4, 64)), jnp.float16)
    ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    spec = P("data", None, "model")
    sm = lambda fn: jax.shard_map(lambda x: fn(x, 4), mesh=mesh, in_specs=spec, out_specs=spec)
    loss = lambda fn: (lambda x: jnp.sum(fn(x).astype(jnp.float32) * ct))
    want = [normalize.l2norm(x, 4), jax.grad(loss(lambda x: normalize.l2norm(x, 4)))(x)]
    fwd = jax.jit(sm(_l2norm_op.l2norm)).lower(x).compile()
    grad = jax.jit(jax.grad(loss(sm(_l2norm_op.l2norm)))).lower(x).compile()
    return dict(max_err=_max_err([fwd(x), grad(x)], want),
                collectives=sorted(set(COLLECTIVES.findall(fwd.as_text() + grad.as_text()))))


def run_public(axis_type):
    """The public op resolves implementation "cuda" (availability forced on) and so normalises
    q and k with the fused op; compare with the XLA path, unsharded."""
    rng = np.random.default_rng(2)
    B, T, S, N, K, H = 4, 24, 24, 4, 2, 32
    q, k, v = (jnp.asarray(rng.normal(size=(B, L, n, H)), jnp.bfloat16)
               for L, n in ((T, N), (S, K), (S, K)))
    loss = lambda impl: (lambda q, k, v: jnp.sum(jnp.sin(jca.cosine_sim_attention(
        q, k, v, is_causal=True, groups=2, implementation=impl).astype(jnp.float32))))
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    helper = jca.sharded_cosine_sim_attention(mesh, batch_axes="data", head_axes="model",
                                              is_causal=True, groups=2)
    helper_loss = lambda q, k, v: jnp.sum(jnp.sin(helper(q, k, v).astype(jnp.float32)))
    report = {}
    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("data", None, "model", None))
        args = [jax.device_put(x, spec) for x in (q, k, v)]
        for name, fn in (("jit", loss(None)), ("helper", helper_loss)):
            compiled = jax.jit(jax.grad(fn, argnums=(0, 1, 2))).lower(*args).compile()
            text = compiled.as_text()
            report[name] = dict(max_err=_max_err(compiled(*args), want),
                                collectives=sorted(set(COLLECTIVES.findall(text))))
    return report


if __name__ == "__main__":
    assert len(jax.devices()) == 4, jax.devices()
    results = {f"op-{t.name}": run_op(t) for t in (AxisType.Auto, AxisType.Explicit)}
    results["shard_map"] = run_shard_map()
    results.update({f"public-{t.name}": run_public(t) for t in (AxisType.Auto, AxisType.Explicit)})
    json.dump(results, sys.stdout, indent=1)
