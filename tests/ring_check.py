"""Ring attention checks, run by tests/test_ring_attention.py in a subprocess (and by
scripts/gpu_ring_check.sh on real GPUs).

On CPU the caller sets XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax is imported.
Prints one JSON object: {case: {"max_err_out", "max_err_grad", "collectives", "all_gathers",
"finite", ...}}. Every case compares the sharded result (forward and gradients of q, k, v and
the per-head scale) against the same op run unsharded.

Usage: python ring_check.py [--dtype float32|bfloat16] [--seq 64] [--xla-blocks 8]
"""

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_cosine_attention import cosine_sim_attention, ring_cosine_sim_attention
from jax_cosine_attention import _ring, _xla

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def collectives(compiled_text):
    found = re.findall(r"= [^=]*? (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", compiled_text)
    return sorted(set(found))


def all_gathers(compiled_text):
    return [l.strip()[:200] for l in compiled_text.splitlines()
            if re.search(r"= [^=]*? all-gather(-start)?\(", l)]


def max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-6))


def data(B, T, N, K, H, dtype, seed=0):
    r = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(r.normal(size=s), dtype)
    return mk(B, T, N, H), mk(B, T, K, H), mk(B, T, K, H), mk(B, T, N, H)


def compare(ring_fn, plain_fn, args, cot, plain_args=None, unpermute=None, unpermute_bias=None):
    """Forward and grads (q, k, v, scale[, bias]) of ring_fn vs plain_fn; errors + HLO info.

    `unpermute` maps ring outputs/gradients (e.g. in zig-zag order) back to plain's order;
    `unpermute_bias` does the same for the bias gradient."""
    def loss(fn, cot):
        def f(*a):
            o = fn(*a)
            return jnp.sum(o.astype(jnp.float32) * cot.astype(jnp.float32)), o
        return jax.jit(jax.grad(f, argnums=tuple(range(len(args))), has_aux=True))

    un = unpermute or (lambda x: x)
    t0 = time.perf_counter()
    compiled = loss(ring_fn, cot if unpermute is None else permute_like(cot, args[0])).lower(
        *args).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    gr, o_r = compiled(*args)
    gp, o_p = loss(plain_fn, cot)(*(plain_args or args))
    o_r = un(o_r)
    gr = (un(gr[0]), un(gr[1]), un(gr[2]), gr[3]) + tuple(
        (unpermute_bias or (lambda x: x))(g) for g in gr[4:])
    finite = bool(all(bool(jnp.all(jnp.isfinite(x))) for x in (o_r, *gr)))
    return {
        "max_err_out": rel_err(o_r, o_p),
        "max_err_grad": max(rel_err(a, b) for a, b in zip(gr, gp)),
        "grad_errs": [rel_err(a, b) for a, b in zip(gr, gp)],
        "collectives": collectives(text),
        "all_gathers": all_gathers(text)[:4],
        "finite": finite,
        "compile_s": round(compile_s, 2),
        "uses_kernel": "jca_cosattn" in text,
    }


def permute_like(cot, _):
    return PERMUTE(cot)


PERMUTE = None


def cuda_lowering(mesh, kv_len):
    """Kernel availability monkeypatched; lowering only (nothing runs). Per layout: the
    `causal` attribute of each fwd / bwd kernel call in the ring program."""
    import jax_cosine_attention._cuda as cuda
    saved = cuda.AVAILABLE, cuda.IMPORT_ERROR
    cuda.AVAILABLE, cuda.IMPORT_ERROR = True, None
    try:
        out = {}
        T = 256
        q = jnp.zeros((2, T, 4, 64), jnp.bfloat16)
        k = jnp.zeros((2, T, 2, 64), jnp.bfloat16)
        lens = jnp.array([200, T], jnp.int32)
        for layout in ("contiguous", "zigzag"):
            f = ring_cosine_sim_attention(mesh, "sp", layout=layout, is_causal=True)
            loss = lambda q, k, v, f=f: jnp.sum(
                f(q, k, v, key_value_seq_lengths=lens).astype(jnp.float32))
            text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
                lowering_platforms=("cuda",)).as_text()
            calls = re.findall(r"custom_call @jca_cosattn_(fwd|bwd)\(.*?mhlo\.backend_config = "
                               r"\{[^}]*causal = (true|false)", text)
            out[layout] = {kind: [c == "true" for w, c in calls if w == kind]
                           for kind in ("fwd", "bwd")}
            out[layout]["collective_permutes"] = text.count("collective_permute")
        return out
    finally:
        cuda.AVAILABLE, cuda.IMPORT_ERROR = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--xla-blocks", type=int, default=8)
    ap.add_argument("--only", default="")
    ap.add_argument("--assert-tol", type=float, default=None,
                    help="also check every ring case (errors below this, collective-permute, "
                         "no all-gather) and exit 1 on a failure; the summary goes to stderr")
    ap.add_argument("--require-kernel", action="store_true",
                    help="with --assert-tol: a ring case whose program has no CUDA kernel call fails")
    args = ap.parse_args()
    if args.xla_blocks:
        _xla.BLOCK_SIZES = (args.xla_blocks, args.xla_blocks)
    dtype = jnp.dtype(args.dtype)
    n = jax.device_count()
    auto = jax.sharding.AxisType.Auto
    B, T, N, H = 2, args.seq, args.heads, args.head_dim
    K = max(1, N // 2)                                  # GQA: 2 query heads per kv head
    q, k, v, cot = data(B, T, N, K, H, dtype)
    scale = jnp.linspace(4.0, 8.0, N, dtype=jnp.float32)
    kv_len = jnp.array([T - T // 4 - 3, T], jnp.int32)  # key padding, not block-aligned
    q_len = jnp.array([T, T // 2 + 1], jnp.int32)
    kv_len0 = jnp.array([0, T // 3], jnp.int32)          # batch 0 has no valid key at all
    key_mask = jnp.asarray(np.random.default_rng(1).random((B, 1, 1, T)) > 0.3)
    key_mask = key_mask.at[:, :, :, -1].set(True)
    key_bias = jnp.asarray(np.random.default_rng(2).normal(size=(B, N, 1, T)), jnp.float32)
    results = {}

    def want(name):
        return not args.only or name in args.only.split(",")

    seq_mesh = jax.make_mesh((n,), ("sp",), axis_types=(auto,))

    # ---- explicit shard_map helper (zig-zag inputs are permuted outside the measured program)
    global PERMUTE
    zig = lambda x, ax=1: _ring.to_zigzag(x, n, axis=ax)
    unzig = lambda x: _ring.from_zigzag(x, n)
    lens = dict(key_value_seq_lengths=kv_len, query_seq_lengths=q_len)
    for layout, causal in (("contiguous", False), ("zigzag", True)):
        name = f"helper-{layout}-{'causal' if causal else 'full'}"
        if not want(name):
            continue
        f = ring_cosine_sim_attention(seq_mesh, "sp", layout=layout, is_causal=causal)
        ring_fn = lambda q, k, v, s, f=f: f(q, k, v, scale=s, **lens)
        plain = lambda q, k, v, s, c=causal: cosine_sim_attention(q, k, v, scale=s, is_causal=c,
                                                                  **lens)
        if layout == "zigzag":
            PERMUTE = zig
            results[name] = compare(ring_fn, plain, (zig(q), zig(k), zig(v), scale), cot,
                                    plain_args=(q, k, v, scale), unpermute=unzig)
        else:
            results[name] = compare(ring_fn, plain, (q, k, v, scale), cot)

    # ---- ring over two mesh axes, key-padding mask, an empty batch element
    two = (2, n // 2) if n >= 4 else (1, n)  # (1, n) on 2 devices: still a 2-axis ring
    if n >= 2 and want("helper-2axes-zigzag-mask"):
        mesh2 = jax.make_mesh(two, ("x", "y"), axis_types=(auto, auto))
        f = ring_cosine_sim_attention(mesh2, ("x", "y"), layout="zigzag", is_causal=True)
        zmask = zig(key_mask, 3)
        ring_fn = lambda q, k, v, s, b: f(q, k, v, b, mask=zmask, scale=s,
                                          key_value_seq_lengths=kv_len0)
        plain = lambda q, k, v, s, b: cosine_sim_attention(q, k, v, b, mask=key_mask, scale=s,
                                                           is_causal=True,
                                                           key_value_seq_lengths=kv_len0)
        PERMUTE = zig
        results["helper-2axes-zigzag-mask"] = compare(
            ring_fn, plain, (zig(q), zig(k), zig(v), scale, zig(key_bias, 3)), cot,
            plain_args=(q, k, v, scale, key_bias), unpermute=unzig,
            unpermute_bias=lambda g: _ring.from_zigzag(g, n, axis=3))
    # ---- batch x sequence mesh, MQA (one kv head)
    if n >= 2 and want("helper-batch-seq-mqa"):
        mesh3 = jax.make_mesh(two, ("dp", "sp"), axis_types=(auto, auto))
        q1, k1, v1, _ = data(B, T, N, 1, H, dtype, seed=3)
        f = ring_cosine_sim_attention(mesh3, "sp", batch_axes="dp", is_causal=True)
        ring_fn = lambda q, k, v, s: f(q, k, v, scale=s, key_value_seq_lengths=kv_len)
        plain = lambda q, k, v, s: cosine_sim_attention(q, k, v, scale=s, is_causal=True,
                                                        key_value_seq_lengths=kv_len)
        results["helper-batch-seq-mqa"] = compare(ring_fn, plain, (q1, k1, v1, scale), cot)

    # ---- plain cosine_sim_attention under jit with sequence-sharded NamedSharding inputs
    def hook_case(name, mesh, spec, causal, bias=None, **kw):
        sh = NamedSharding(mesh, spec)
        placed = tuple(jax.device_put(x, sh) for x in (q, k, v))
        extra = () if bias is None else (bias,)
        fn = lambda q, k, v, s, *b: cosine_sim_attention(q, k, v, *b, scale=s, is_causal=causal,
                                                         **kw)
        results[name] = compare(fn, fn, placed + (scale,) + extra, cot,
                                plain_args=(q, k, v, scale) + extra)

    if want("hook-causal"):
        hook_case("hook-causal", seq_mesh, P(None, "sp", None, None), True,
                  bias=key_bias[:1], key_value_seq_lengths=kv_len)
    if want("hook-explicit-causal"):  # Explicit mesh: api routes to the shard_map ring
        emesh = jax.make_mesh((n,), ("sp",), axis_types=(jax.sharding.AxisType.Explicit,))
        hook_case("hook-explicit-causal", emesh, P(None, "sp", None, None), True,
                  bias=key_bias[:, :1], key_value_seq_lengths=kv_len, query_seq_lengths=q_len)
    if n >= 2 and want("hook-batch-seq-mask"):
        mesh3 = jax.make_mesh(two, ("dp", "sp"), axis_types=(auto, auto))
        hook_case("hook-batch-seq-mask", mesh3, P("dp", "sp", None, None), False, mask=key_mask,
                  query_seq_lengths=q_len)
    if want("hook-disabled"):  # JCA_RING=0: the old behaviour, sequence all-gathered (fwd only)
        os.environ["JCA_RING"] = "0"
        sh = NamedSharding(seq_mesh, P(None, "sp", None, None))
        placed = tuple(jax.device_put(x, sh) for x in (q, k, v))
        fn = jax.jit(lambda q, k, v: cosine_sim_attention(q, k, v, is_causal=True,
                                                          query_seq_lengths=q_len))
        text = fn.lower(*placed).compile().as_text()
        results["hook-disabled"] = {"collectives": collectives(text),
                                    "max_err_out": rel_err(fn(*placed), fn(q, k, v))}
        os.environ["JCA_RING"] = "1"

    # ---- a full [T, S] bias with a sharded sequence is rejected by the helper
    if want("helper-bias-error"):
        f = ring_cosine_sim_attention(seq_mesh, "sp")
        try:
            f(q, k, v, bias=jnp.zeros((1, 1, T, T)))
            results["helper-bias-error"] = {"raised": None}
        except ValueError as e:
            results["helper-bias-error"] = {"raised": str(e)}

    # ---- CPU only: lowering for "cuda" puts the fused kernel in every ring block
    if jax.default_backend() == "cpu" and want("cuda-lowering"):
        results["cuda-lowering"] = cuda_lowering(seq_mesh, kv_len)

    results["_meta"] = {"devices": [str(d) for d in jax.devices()], "dtype": str(dtype),
                        "seq": T, "backend": jax.default_backend()}
    json.dump(results, sys.stdout)
    if args.assert_tol is not None:
        sys.exit(check(results, args.assert_tol, args.require_kernel))


def check(results, tol, require_kernel=False):
    bad = 0
    for name, r in results.items():
        if name.startswith("_") or "max_err_grad" not in r:
            continue
        problems = []
        if not r["finite"]:
            problems.append("non-finite")
        if r["max_err_out"] > tol or r["max_err_grad"] > tol:
            problems.append(f"err out {r['max_err_out']:.2e} grad {r['max_err_grad']:.2e}")
        if "collective-permute" not in r["collectives"] or "all-gather" in r["collectives"]:
            problems.append(f"collectives {r['collectives']}")
        if require_kernel and not r["uses_kernel"]:
            problems.append("no CUDA kernel call in the compiled program")
        bad += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {name}: out {r['max_err_out']:.2e} grad "
              f"{r['max_err_grad']:.2e} kernel={r['uses_kernel']} {r['collectives']} "
              f"{'; '.join(problems)}", file=sys.stderr)
    r = results.get("hook-disabled")
    if r is not None and "all-gather" not in r["collectives"]:
        print(f"FAIL hook-disabled: {r}", file=sys.stderr)
        bad += 1
    print(f"ring_check: {bad} failing case(s)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    main()
