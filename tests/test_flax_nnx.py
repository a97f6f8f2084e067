"""Flax nnx integration: the attention_fn drop-in and the CosineSimAttention module (CPU)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
import flax.linen as nn  # noqa: E402

from jax_cosine_attention import cosine_sim_attention_reference  # noqa: E402
from jax_cosine_attention.flax import cosine_sim_attention_fn  # noqa: E402
from jax_cosine_attention.flax import _attend  # noqa: E402
from jax_cosine_attention.flax.nnx import CosineSimAttention  # noqa: E402
from mesh_report import collectives, run_mesh_check, spec4  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _v(var):
    return var.get_value() if hasattr(var, "get_value") else var.value


def _proj(lin, x):
    y = jnp.einsum("...d,dnh->...nh", x, _v(lin.kernel))
    return y + _v(lin.bias) if lin.bias is not None else y


def reference_layer(m, xq, xkv=None, *, bias=None, mask=None, **options):
    """Cosine-sim attention with the layer's own projections, via the dense reference."""
    xkv = xq if xkv is None else xkv
    q, k, v = _proj(m.query, xq), _proj(m.key, xkv), _proj(m.value, xkv)
    if getattr(m, "logit_scale", None) is not None:
        options["scale"] = jnp.exp(jnp.minimum(_v(m.logit_scale), np.log(100.0)))
    o = cosine_sim_attention_reference(q, k, v, bias, mask, **options)
    y = jnp.einsum("...nh,nhd->...d", o, _v(m.out.kernel))
    return y + _v(m.out.bias) if m.out.bias is not None else y


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ------------------------------------------------------------------ the one-argument switch

def test_stock_mha_switch_gqa_causal_matches_reference():
    x = _x((2, 5, 16))
    fn = functools.partial(cosine_sim_attention_fn, scale=12.0)
    m = nnx.MultiHeadAttention(num_heads=4, in_features=16, num_kv_heads=2, attention_fn=fn,
                               decode=False, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x, is_causal=True))(m, x)
    ref = nnx.jit(lambda m, x: reference_layer(m, x, scale=12.0, is_causal=True))(m, x)
    np.testing.assert_allclose(y, ref, **TOL)


def test_stock_mha_dropout_and_sown_weights():
    x = _x((2, 4, 8))
    m = nnx.MultiHeadAttention(num_heads=2, in_features=8, dropout_rate=0.5, decode=False,
                               attention_fn=cosine_sim_attention_fn, rngs=nnx.Rngs(0))
    call = nnx.jit(lambda m, x, det: m(x, deterministic=det), static_argnums=2)
    off = call(m, x, True)
    np.testing.assert_allclose(off, nnx.jit(reference_layer)(m, x), **TOL)
    on1, on2 = call(m, x, False), call(m, x, False)  # the kept rng stream advances
    assert np.abs(on1 - off).max() > 1e-3 and np.abs(on1 - on2).max() > 1e-3
    sown = lambda m, x: m(x, deterministic=True, sow_weights=True)  # noqa: E731
    if hasattr(nnx, "capture"):  # newer flax: sowing outside nnx.capture is deprecated
        y, intermediates = nnx.jit(nnx.capture(sown, nnx.Intermediate))(m, x)
        (w,) = jax.tree.leaves(intermediates)
    else:
        y = nnx.jit(sown)(m, x)
        (w,) = jax.tree.leaves(nnx.state(m, nnx.Intermediate))
    assert w.shape == (2, 2, 4, 4)
    np.testing.assert_allclose(w.sum(-1), 1.0, **TOL)
    np.testing.assert_allclose(y, off, **TOL)


def test_stock_mha_decode_equals_causal_forward():
    x = _x((2, 6, 8))
    m = nnx.MultiHeadAttention(num_heads=2, in_features=8, num_kv_heads=1, decode=False,
                               attention_fn=cosine_sim_attention_fn, rngs=nnx.Rngs(0))
    full = nnx.jit(lambda m, x: m(x, is_causal=True))(m, x)
    m.init_cache(x.shape)
    step = nnx.jit(lambda m, xt: m(xt, decode=True))
    outs = [step(m, x[:, t:t + 1]) for t in range(6)]
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)


# ------------------------------------------------------------------ the module

def test_module_matches_reference_gqa_learned_scale_bias_mask():
    x, ctx = _x((2, 5, 16)), _x((2, 7, 12), 1)
    bias = 0.5 * _x((1, 4, 5, 7), 2)
    mask = (jnp.arange(7) < jnp.array([7, 4])[:, None])[:, None, None, :]
    m = CosineSimAttention(4, 16, qkv_features=32, num_kv_heads=2, in_kv_features=12,
                           learned_scale=True, groups=2, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_v(m.logit_scale), np.log(10.0) * np.ones(4), rtol=1e-6)
    run = nnx.jit(lambda m, x, c, b, k: (m(x, c, bias=b, mask=k, is_causal=True),
                                         reference_layer(m, x, c, bias=b, mask=k, groups=2,
                                                         is_causal=True)))
    y, ref = run(m, x, ctx, bias, mask)
    np.testing.assert_allclose(y, ref, **TOL)


def test_module_gradients_reach_every_parameter_and_the_bias():
    x = _x((2, 6, 16))
    bias = 0.3 * _x((1, 4, 6, 6), 1)
    m = CosineSimAttention(4, 16, num_kv_heads=2, learned_scale=True, is_causal=True,
                           rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m, nnx.Param)

    def loss(p, b, ref):
        mod = nnx.merge(graphdef, p)
        y = reference_layer(mod, x, bias=b, is_causal=True) if ref else mod(x, bias=b)
        return jnp.sum(jnp.sin(y))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    (g, db), (rg, rdb) = grads(params, bias, False), grads(params, bias, True)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(g)]
    assert any("logit_scale" in n for n in names) and len(names) == 9, names
    for name, leaf in zip(names, jax.tree.leaves(g)):
        assert np.abs(leaf).max() > 0, f"no gradient reaches {name}"
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(rg)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(db, rdb, atol=1e-4, rtol=1e-4)


def test_module_decode_equals_causal_forward():
    x = _x((2, 7, 16))
    m = CosineSimAttention(4, 16, num_kv_heads=2, is_causal=True, rngs=nnx.Rngs(0))
    full = nnx.jit(lambda m, x: m(x))(m, x)
    m.init_cache(x.shape)
    step = nnx.jit(lambda m, xt: m(xt, decode=True))
    outs = [step(m, x[:, lo:hi]) for lo, hi in ((0, 3), (3, 4), (4, 5), (5, 6), (6, 7))]
    assert int(_v(m.cache_index)) == 7
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)


def test_module_dropout_on_and_off():
    x = _x((2, 5, 8))
    m = CosineSimAttention(2, 8, dropout_rate=0.3, rngs=nnx.Rngs(0))
    call = nnx.jit(lambda m, x, det: m(x, deterministic=det), static_argnums=2)
    off = call(m, x, True)
    np.testing.assert_allclose(off, nnx.jit(reference_layer)(m, x), **TOL)
    on1, on2 = call(m, x, False), call(m, x, False)
    assert np.abs(on1 - off).max() > 1e-3 and np.abs(on1 - on2).max() > 1e-3
    keyed = nnx.jit(lambda m, x, k: m(x, deterministic=False, rngs=k))
    np.testing.assert_allclose(keyed(m, x, jax.random.key(5)), keyed(m, x, jax.random.key(5)))
    with pytest.raises(ValueError, match="deterministic"):
        m(x)


def test_module_dtypes_and_annotations():
    x = _x((2, 4, 16)).astype(jnp.bfloat16)
    m = CosineSimAttention(2, 16, learned_scale=True, dtype=jnp.bfloat16,
                           param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    y = nnx.jit(lambda m, x: m(x))(m, x)
    assert y.dtype == jnp.bfloat16
    ref = reference_layer(m, x.astype(jnp.float32))
    np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=5e-2, rtol=5e-2)
    rules = [("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("embed", None),
             ("kv", None), ("length", None)]
    with nn.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    assert tuple(_v(specs["query"]["kernel"])) == (None, "model", None)
    assert tuple(_v(specs["out"]["kernel"])) == ("model", None, None)
    assert tuple(_v(specs["logit_scale"])) == ("model",)


# ------------------------------------------------------------------ 4-device mesh (subprocess)

def _mesh_check():
    """Runs in a subprocess with 4 host devices; prints a JSON report per mesh axis type."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    jax.config.update("jax_disable_most_optimizations", True)  # SPMD partitioning still runs
    rules = [("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("embed", None),
             ("kv", None), ("length", None)]
    x = _x((4, 8, 16))
    bias = 0.1 * _x((1, 4, 8, 8), 1)
    model = CosineSimAttention(4, 16, qkv_features=32, num_kv_heads=2, learned_scale=True,
                               is_causal=True, rngs=nnx.Rngs(0))
    graphdef, params0 = nnx.split(model, nnx.Param)
    apply = lambda p, x, b: nnx.merge(graphdef, p)(x, bias=b)  # noqa: E731
    y_ref = jax.jit(apply)(params0, x, bias)
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
            params = jax.device_put(params0, nnx.get_named_sharding(params0, mesh))
            xs = jax.device_put(x, NamedSharding(mesh, P("data")))
            bs = jax.device_put(bias, NamedSharding(mesh, P(None, "model")))
            fwd = jax.jit(apply)
            fwd_hlo = fwd.lower(params, xs, bs).compile().as_text()
            y = fwd(params, xs, bs)
            grad = jax.jit(jax.grad(lambda p, x, b: jnp.sum(apply(p, x, b) ** 2)))
            grad_hlo = grad.lower(params, xs, bs).compile().as_text()
            grad(params, xs, bs)
            kernel_spec = str(jax.tree.leaves(params["query"]["kernel"])[0].sharding.spec)
        report[str(kind)] = dict(fwd=collectives(fwd_hlo), grad=collectives(grad_hlo),
                                 qkv=[s for s in seen if s is not None], kernel_spec=kernel_spec,
                                 err=float(jnp.abs(y - y_ref).max()))
    print(json.dumps(report))


@pytest.fixture(scope="module")
def mesh_report():
    return run_mesh_check("test_flax_nnx")


@pytest.mark.parametrize("axis_type", ["AxisType.Auto", "AxisType.Explicit"])
def test_mesh_data_model_no_collectives_in_attention(mesh_report, axis_type):
    r = mesh_report[axis_type]
    assert r["err"] < 1e-5
    assert "model" in r["kernel_spec"], r["kernel_spec"]
    # q, k, v reach the op sharded over batch (data) and heads (model).
    assert r["qkv"] and all(s == ["data", None, "model", None] for s in r["qkv"]), r["qkv"]
    # Forward: the only collective is the out projection's reduction over the sharded heads.
    assert [kind for kind, _ in r["fwd"]] == ["all-reduce"], r["fwd"]
    # Backward: only all-reduces (of parameter gradients), no gathers or resharding.
    assert r["grad"] and {kind for kind, _ in r["grad"]} == {"all-reduce"}, r["grad"]
