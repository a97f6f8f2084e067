"""Run in a subprocess with 4 host CPU devices (see test_sharding.py): batch x head sharded
forward and gradients compile with no collectives and equal the unsharded result."""

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
from jax_cosine_attention import _xla

_xla.BLOCK_SIZES = (16, 16)
COLLECTIVES = re.compile(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter")


def run(axis_type, K, use_bias):
    rng = np.random.default_rng(0)
    B, T, S, N, H = 4, 40, 24, 4, 16
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(B, N, T, S)), jnp.float32) if use_bias else None
    mask = jnp.asarray(rng.uniform(size=(B, 1, 1, S)) < 0.8)

    def fwd(q, k, v, bias):
        return jca.cosine_sim_attention(q, k, v, bias, mask, is_causal=True)

    def loss(q, k, v, bias):
        return jnp.sum(jnp.sin(fwd(q, k, v, bias)))

    argnums = (0, 1, 2, 3) if use_bias else (0, 1, 2)
    grad = jax.grad(loss, argnums=argnums)
    want_out, want_grads = fwd(q, k, v, bias), grad(q, k, v, bias)

    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    report = {}
    with jax.set_mesh(mesh):
        heads = "model"
        put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
        qs = put(q, P("data", None, heads, None))
        kv_spec = P("data", None, heads if K % 2 == 0 else None, None)
        ks, vs = put(k, kv_spec), put(v, kv_spec)
        bs = put(bias, P("data", heads, None, None)) if use_bias else None
        for name, f, expected in (("fwd", fwd, [want_out]), ("grad", grad, list(want_grads))):
            compiled = jax.jit(f).lower(qs, ks, vs, bs).compile()
            got = compiled(qs, ks, vs, bs)
            got = list(got) if isinstance(got, tuple) else [got]
            report[name] = dict(
                collectives=sorted(set(COLLECTIVES.findall(compiled.as_text()))),
                max_err=max(float(jnp.max(jnp.abs(g - e))) for g, e in zip(got, expected)),
                out_spec=str(got[0].sharding.spec))
    return report


def run_shard_map():
    rng = np.random.default_rng(1)
    B, T, S, N, H = 4, 24, 24, 4, 16
    q, k, v = (jnp.asarray(rng.normal(size=(B, L, N, H)), jnp.float32) for L in (T, S, S))
    scale = jnp.asarray(rng.uniform(5, 15, size=N), jnp.float32)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    f = jca.sharded_cosine_sim_attention(mesh, batch_axes="data", head_axes="model", is_causal=True)
    loss = lambda q, k, v, s: jnp.sum(jnp.sin(f(q, k, v, scale=s)))
    ref_loss = lambda q, k, v, s: jnp.sum(jnp.sin(jca.cosine_sim_attention(q, k, v, scale=s, is_causal=True)))
    want = jax.grad(ref_loss, argnums=(0, 1, 2, 3))(q, k, v, scale)
    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("data", None, "model", None))
        args = [jax.device_put(x, spec) for x in (q, k, v)] + [scale]
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
        got = compiled(*args)
    text = compiled.as_text()
    return dict(collectives=sorted(set(COLLECTIVES.findall(text))),
                max_err=max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want)))


def run_norm_op():
    """The op with the l2norm of q, k inside (Config.norm_eps: on sm_90 GPUs its kernels fuse the
    l2norm backward; here its XLA route), sharded under an Auto mesh, against the same op
    unsharded: heads sharded (causal T != S), then the sequence (ring attention, causal T == S,
    then the l2norm backward on the local rows)."""
    from jax_cosine_attention import _ops
    rng = np.random.default_rng(2)
    B, N, K, H = 4, 4, 2, 16
    cfg = _ops.Config(is_causal=True, groups=1, bounded=True, implementation="xla",
                      deterministic=False, present=("kv_len",), bias_full=None, mask_full=None,
                      need_dbias=False, norm_eps=1e-6)
    loss = lambda q, k, v, s, kl: jnp.sum(jnp.sin(
        _ops.attention_core(q, k, v, s, None, None, None, kl, cfg)))
    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    report = {}
    for name, spec, T, S in (("heads", P("data", None, "model", None), 40, 24),
                             ("ring", P("data", "model", None, None), 40, 40)):
        q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
        k, v = (jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32) for _ in range(2))
        scale = jnp.asarray(rng.uniform(5, 15, size=N), jnp.float32)
        kv_len = jnp.asarray([S, S - 7, 5, S - 4], jnp.int32)
        want = grad(q, k, v, scale, kv_len)
        with jax.set_mesh(mesh):
            put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
            args = (put(q, spec), put(k, spec), put(v, spec), scale, put(kv_len, P("data")))
            compiled = jax.jit(grad).lower(*args).compile()
            got = compiled(*args)
        report[name] = dict(
            collectives=sorted(set(COLLECTIVES.findall(compiled.as_text()))),
            max_err=max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want)))
    return report


if __name__ == "__main__":
    assert len(jax.devices()) == 4, jax.devices()
    results = {}
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        for K, use_bias in ((2, True), (4, False), (1, False)):
            results[f"{axis_type.name}-K{K}-bias{int(use_bias)}"] = run(axis_type, K, use_bias)
    results["shard_map"] = run_shard_map()
    results["norm_op"] = run_norm_op()
    json.dump(results, sys.stdout, indent=1)
