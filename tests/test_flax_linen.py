"""Flax linen integration: the attention_fn drop-in and the CosineSimAttention module (CPU)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")

from jax_cosine_attention import cosine_sim_attention_reference  # noqa: E402
from jax_cosine_attention.flax import cosine_sim_attention_fn  # noqa: E402
from jax_cosine_attention.flax import _attend  # noqa: E402
from jax_cosine_attention.flax.linen import CosineSimAttention  # noqa: E402
from mesh_report import collectives, run_mesh_check, spec4  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _proj(p, x):
    y = jnp.einsum("...d,dnh->...nh", x, p["kernel"])
    return y + p["bias"] if "bias" in p else y


@functools.partial(jax.jit, static_argnames=("scale", "groups", "is_causal"))
def reference_layer(params, xq, xkv=None, *, bias=None, mask=None, **options):
    """Cosine-sim attention with the layer's own projections, via the dense reference."""
    p = nn.unbox(params)
    xkv = xq if xkv is None else xkv
    q, k, v = _proj(p["query"], xq), _proj(p["key"], xkv), _proj(p["value"], xkv)
    if "logit_scale" in p:
        options["scale"] = jnp.exp(jnp.minimum(p["logit_scale"], np.log(100.0)))
    lead = q.shape[:-3]
    flat = lambda a: a.reshape((-1,) + a.shape[len(lead):])  # noqa: E731
    o = cosine_sim_attention_reference(flat(q), flat(k), flat(v), bias, mask, **options)
    y = jnp.einsum("...nh,nhd->...d", o.reshape(lead + o.shape[1:]), p["out"]["kernel"])
    return y + p["out"]["bias"] if "bias" in p["out"] else y


def jitted(f, *args, **kwargs):
    """f(*args, **kwargs) under one jit; non-array keywords (flags, lists) are static."""
    dynamic = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, dict))}
    static = {k: v for k, v in kwargs.items() if k not in dynamic}
    return jax.jit(functools.partial(f, **static))(*args, **dynamic)


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ------------------------------------------------------------------ the one-argument switch

def test_stock_mha_switch_matches_reference():
    x = _x((2, 5, 16))
    fn = functools.partial(cosine_sim_attention_fn, scale=12.0, groups=2)
    m = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, attention_fn=fn)
    params = jitted(m.init, jax.random.key(1), x)
    kpad = jnp.arange(5)[None, :] < jnp.array([5, 3])[:, None]
    mask = nn.make_attention_mask(jnp.ones((2, 5)), kpad)  # float [B,1,T,S], as flax makes it
    y = jitted(m.apply, params, x, mask=mask)
    ref = reference_layer(params["params"], x, mask=mask.astype(bool), scale=12.0, groups=2)
    np.testing.assert_allclose(y, ref, **TOL)


def test_adapter_leading_batch_dims_and_key_padding_mask_passed_as_is(monkeypatch):
    q, k, v = _x((2, 3, 4, 2, 8), 1), _x((2, 3, 6, 2, 8), 2), _x((2, 3, 6, 2, 8), 3)
    kmask = jnp.arange(6) < jnp.array([[6, 2, 4], [1, 5, 3]])[..., None]  # [2,3,S]
    kmask = kmask[:, :, None, None, :]                                    # [2,3,1,1,S]
    bias = _x((1, 1, 2, 4, 6), 4)
    seen = {}
    real = _attend.cosine_sim_attention

    def spy(*a, **kw):
        seen["mask"] = a[4].shape
        return real(*a, **kw)

    monkeypatch.setattr(_attend, "cosine_sim_attention", spy)
    out = cosine_sim_attention_fn(q, k, v, bias, kmask, is_causal=True)
    assert seen["mask"] == (6, 1, 1, 6)  # no T x S mask was built
    flat = lambda a: a.reshape((6,) + a.shape[2:])  # noqa: E731
    ref = cosine_sim_attention_reference(flat(q), flat(k), flat(v), bias[0], flat(kmask),
                                         is_causal=True)
    np.testing.assert_allclose(out, ref.reshape(out.shape), **TOL)
    dense = jnp.broadcast_to(kmask, (2, 3, 1, 4, 6)) & (jnp.arange(4)[:, None] >= 0)
    np.testing.assert_allclose(cosine_sim_attention_fn(q, k, v, bias, dense, is_causal=True),
                               out, **TOL)


def test_adapter_rejects_what_it_cannot_do():
    q = _x((1, 3, 2, 8))
    with pytest.raises(NotImplementedError):
        cosine_sim_attention_fn(q, q, q, qk_attn_weights_einsum=jnp.einsum)
    with pytest.raises(TypeError):
        cosine_sim_attention_fn(q, q, q, input_positions=jnp.arange(3))
    cosine_sim_attention_fn(q, q, q, some_future_flag=None)  # inert extras are accepted
    with pytest.raises(ValueError, match="dropout_rng"):
        cosine_sim_attention_fn(q, q, q, dropout_rate=0.1, deterministic=False)


def test_stock_mha_dropout_and_sown_weights():
    x = _x((2, 4, 8))
    m = nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.5,
                                        attention_fn=cosine_sim_attention_fn)
    params = jitted(m.init, jax.random.key(1), x, deterministic=True)
    off = jitted(m.apply, params, x, deterministic=True)
    np.testing.assert_allclose(off, reference_layer(params["params"], x), **TOL)
    on1 = jitted(m.apply, params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    on2 = jitted(m.apply, params, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert np.abs(on1 - off).max() > 1e-3 and np.abs(on1 - on2).max() > 1e-3
    y, state = jitted(m.apply, params, x, deterministic=True, sow_weights=True, mutable=["intermediates"])
    (w,) = state["intermediates"]["attention_weights"]
    assert w.shape == (2, 2, 4, 4)
    np.testing.assert_allclose(w.sum(-1), 1.0, **TOL)
    np.testing.assert_allclose(y, off, **TOL)


def test_stock_mha_decode_equals_causal_forward():
    x = _x((2, 6, 8))
    fn = functools.partial(cosine_sim_attention_fn, is_causal=True)
    full_m = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=fn)
    params = jitted(full_m.init, jax.random.key(1), x)["params"]
    full = jitted(full_m.apply, {"params": params}, x)
    dec = full_m.clone(decode=True)
    cache = jitted(dec.init, jax.random.key(1), x)["cache"]
    step = jax.jit(lambda c, xt: dec.apply({"params": params, "cache": c}, xt, mutable=["cache"]))
    outs = []
    for t in range(6):
        y, mut = step(cache, x[:, t:t + 1])
        cache = mut["cache"]
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)


# ------------------------------------------------------------------ the module

def test_module_matches_reference_gqa_learned_scale_bias():
    x, ctx = _x((2, 5, 16)), _x((2, 7, 16), 1)
    bias = 0.5 * _x((1, 4, 5, 7), 2)
    m = CosineSimAttention(num_heads=4, num_kv_heads=2, qkv_features=32, learned_scale=True,
                           groups=2)
    params = jitted(m.init, jax.random.key(3), x, ctx, bias=bias)
    ls = nn.unbox(params)["params"]["logit_scale"]
    np.testing.assert_allclose(ls, np.log(10.0) * np.ones(4), rtol=1e-6)
    mask = (jnp.arange(7) < jnp.array([7, 4])[:, None])[:, None, None, :]
    y = jitted(m.apply, params, x, ctx, bias=bias, mask=mask, is_causal=True)
    ref = reference_layer(params["params"], x, ctx, bias=bias, mask=mask, groups=2, is_causal=True)
    np.testing.assert_allclose(y, ref, **TOL)


def test_module_gradients_reach_every_parameter_and_the_bias():
    x = _x((2, 6, 16))
    bias = 0.3 * _x((1, 4, 6, 6), 1)
    m = CosineSimAttention(num_heads=4, num_kv_heads=2, learned_scale=True, is_causal=True)
    params = nn.unbox(jitted(m.init, jax.random.key(0), x, bias=bias))["params"]
    loss = lambda p, b: jnp.sum(jnp.sin(m.apply({"params": p}, x, bias=b)))  # noqa: E731
    ref_loss = lambda p, b: jnp.sum(jnp.sin(  # noqa: E731
        reference_layer(p, x, bias=b, is_causal=True)))
    grads, dbias = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, bias)
    rgrads, rdbias = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(params, bias)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
                 grads, rgrads)
    np.testing.assert_allclose(dbias, rdbias, atol=1e-4, rtol=1e-4)


def test_module_learned_scale_is_clamped():
    x = _x((1, 3, 8))
    m = CosineSimAttention(num_heads=2, learned_scale=True)
    params = nn.unbox(jitted(m.init, jax.random.key(0), x))["params"]
    params["logit_scale"] = jnp.array([np.log(1000.0), np.log(5.0)], jnp.float32)
    g = jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)))(params)["logit_scale"]
    assert g[0] == 0 and g[1] != 0
    ref = reference_layer(params, x)  # the reference helper applies the same clamp at 100
    np.testing.assert_allclose(jitted(m.apply, {"params": params}, x), ref, **TOL)


def test_module_decode_equals_causal_forward():
    x = _x((2, 7, 16))
    m = CosineSimAttention(num_heads=4, num_kv_heads=1, is_causal=True, decode=True)
    variables = jitted(m.init, jax.random.key(0), x)
    params, cache = variables["params"], variables["cache"]
    full = m.clone(decode=False).apply({"params": params}, x)
    step = jax.jit(lambda c, xt: m.apply({"params": params, "cache": c}, xt, mutable=["cache"]))
    outs = []
    for lo, hi in ((0, 3), (3, 4), (4, 5), (5, 6), (6, 7)):  # a prefill chunk, then tokens
        y, mut = step(cache, x[:, lo:hi])
        cache = mut["cache"]
        outs.append(y)
    assert int(cache["cache_index"]) == 7
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)


def test_module_dropout_on_and_off():
    x = _x((2, 5, 8))
    m = CosineSimAttention(num_heads=2, dropout_rate=0.3)
    params = jitted(m.init, jax.random.key(0), x, deterministic=True)
    off = jitted(m.apply, params, x, deterministic=True)
    np.testing.assert_allclose(off, reference_layer(params["params"], x), **TOL)
    on = jitted(m.apply, params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert np.abs(on - off).max() > 1e-3


def test_module_dtypes():
    x = _x((2, 4, 16)).astype(jnp.bfloat16)
    m = CosineSimAttention(num_heads=2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = jitted(m.init, jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(params)))
    y = jitted(m.apply, params, x)
    assert y.dtype == jnp.bfloat16
    ref = reference_layer(params["params"], x.astype(jnp.float32))
    np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------ 4-device mesh (subprocess)

def _mesh_check():
    """Runs in a subprocess with 4 host devices; prints a JSON report per mesh axis type."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    jax.config.update("jax_disable_most_optimizations", True)  # SPMD partitioning still runs
    rules = [("batch", "data"), ("heads", "model"), ("kv_heads", "model")]
    m = CosineSimAttention(num_heads=4, num_kv_heads=2, qkv_features=32, learned_scale=True,
                           is_causal=True)
    x = _x((4, 8, 16))
    bias = 0.1 * _x((1, 4, 8, 8), 1)
    boxed = jax.jit(m.init)(jax.random.key(1), x)
    specs, params0 = nn.get_partition_spec(boxed), nn.unbox(boxed)
    y_ref = jax.jit(m.apply)(params0, x, bias=bias)
    seen = []
    real = _attend.cosine_sim_attention

    def spy(q, k, v, *a, **kw):
        for t in (q, k, v):
            jax.debug.inspect_array_sharding(t, callback=lambda s: seen.append(spec4(s)))
        return real(q, k, v, *a, **kw)

    _attend.cosine_sim_attention = spy
    report = {}
    for kind in (AxisType.Auto, AxisType.Explicit):
        seen.clear()
        mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(kind,) * 2)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            params = jax.device_put(params0, nn.logical_to_mesh_sharding(specs, mesh, rules))
            xs = jax.device_put(x, NamedSharding(mesh, P("data")))
            bs = jax.device_put(bias, NamedSharding(mesh, P(None, "model")))
            fwd = jax.jit(lambda p, x, b: m.apply(p, x, bias=b))
            fwd_hlo = fwd.lower(params, xs, bs).compile().as_text()
            y = fwd(params, xs, bs)
            grad = jax.jit(jax.grad(lambda p, x, b: jnp.sum(m.apply(p, x, bias=b) ** 2)))
            grad_hlo = grad.lower(params, xs, bs).compile().as_text()
            grad(params, xs, bs)
        report[str(kind)] = dict(fwd=collectives(fwd_hlo), grad=collectives(grad_hlo),
                                 qkv=[s for s in seen if s is not None],
                                 err=float(jnp.abs(y - y_ref).max()))
    print(json.dumps(report))


@pytest.fixture(scope="module")
def mesh_report():
    return run_mesh_check("test_flax_linen")


@pytest.mark.parametrize("axis_type", ["AxisType.Auto", "AxisType.Explicit"])
def test_mesh_data_model_no_collectives_in_attention(mesh_report, axis_type):
    r = mesh_report[axis_type]
    assert r["err"] < 1e-5
    # q, k, v reach the op sharded over batch (data) and heads (model).
    assert r["qkv"] and all(s == ["data", None, "model", None] for s in r["qkv"]), r["qkv"]
    # Forward: the only collective is the out projection's reduction over the sharded heads.
    assert [kind for kind, _ in r["fwd"]] == ["all-reduce"], r["fwd"]
    assert all("/out/" in name for _, name in r["fwd"]), r["fwd"]
    # Backward: only all-reduces (of parameter gradients), no gathers or resharding.
    assert r["grad"] and {kind for kind, _ in r["grad"]} == {"all-reduce"}, r["grad"]
