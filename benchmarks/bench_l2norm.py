"""Fused CUDA l2norm (`_l2norm_op.l2norm`) vs XLA's (`normalize.l2norm`), and the public op with
and without it, in one process.

  python -P benchmarks/bench_l2norm.py [--shapes 4,4096,16,128 4,4096,16,64] [--groups 1]
                                       [--dtype bf16] [--out DIR]

Modes: fwd (y = l2norm(x)) and fwd+bwd (y and dx = vjp(dy), one jit); "public" rows time
cosine_sim_attention(q, k, v, implementation="cuda") (fwd, and grad of q, k, v) at the same shape
with JCA_FUSED_L2NORM=1 (fused) and 0 (XLA l2norm). Back-to-back calls of the compiled function,
device-synchronised per batch, median of 5 batches, ms. Also prints the effective bandwidth of
the l2norm rows (bytes the one-pass kernels must move: fwd 2|x|, fwd+bwd 2|x| + 3|x|).
"""
import argparse
import json
import os
import re
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_cosine_attention as jca  # noqa: E402
from jax_cosine_attention import _cuda, _l2norm_op, normalize  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import bench  # noqa: E402  (the timing loop of benchmarks/bench.py)


def entry_kernels(compiled):
    """Fusions and custom calls in the compiled ENTRY computation (~ kernels launched), with the
    fusion kinds: how many passes XLA makes."""
    txt = compiled.as_text()
    entry = txt[txt.find("ENTRY"):]
    entry = entry[:entry.find("\n}")]
    calls = re.findall(r"= [^\n]*?\b(fusion|custom-call)\(", entry)
    kinds = re.findall(r"\bfusion\([^\n]*?kind=(k\w+)", entry)
    return len(calls), kinds


def l2norm_fns(impl, groups):
    norm = _l2norm_op.l2norm if impl == "fused" else normalize.l2norm
    fwd = jax.jit(lambda x, dy: norm(x, groups))

    def fb(x, dy):
        y, vjp = jax.vjp(lambda x: norm(x, groups), x)
        return y, vjp(dy)[0]
    return {"fwd": fwd, "fwd+bwd": jax.jit(fb)}


def public_fns(groups):
    impl = "cuda" if _cuda.AVAILABLE and jax.default_backend() == "gpu" else None  # (CPU dry run)
    f = lambda q, k, v: jca.cosine_sim_attention(q, k, v, scale=10.0, groups=groups,
                                                 implementation=impl)
    loss = lambda q, k, v, do: jnp.sum(f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    return {"fwd": jax.jit(lambda q, k, v, do: f(q, k, v)),
            "fwd+bwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2)))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4,4096,16,128", "4,4096,16,64"])
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    ap.add_argument("--no-public", action="store_true", help="skip the public-op rows")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    dtype = jnp.bfloat16 if a.dtype == "bf16" else jnp.float16
    dev = jax.devices()[0]
    card = getattr(dev, "device_kind", str(dev))
    print(f"card: {card}; jax {jax.__version__}; cuda kernels available: {_cuda.AVAILABLE}",
          flush=True)
    rows_env = os.environ.get("JCA_L2NORM_ROWS", "default")
    rng = np.random.default_rng(0)
    results = []
    for s in a.shapes:
        shape = tuple(int(d) for d in s.split(","))
        x, dy = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(2))
        nbytes = x.size * x.dtype.itemsize
        for impl in ("xla", "fused"):
            for mode, fn in l2norm_fns(impl, a.groups).items():
                compiled = fn.lower(x, dy).compile()
                ms = bench(compiled, (x, dy))
                moved = (2 if mode == "fwd" else 5) * nbytes
                n_kernels, kinds = entry_kernels(compiled)
                results.append(dict(what="l2norm", impl=impl, mode=mode, shape=shape,
                                    groups=a.groups, dtype=a.dtype, ms=ms,
                                    gbps=moved / (ms * 1e-3) / 1e9, kernels=n_kernels,
                                    fusion_kinds=kinds, rows_per_team=rows_env, card=card))
        if a.no_public or len(shape) != 4:
            continue
        q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                       for _ in range(4))
        for fused in ("0", "1"):
            os.environ["JCA_FUSED_L2NORM"] = fused  # read when traced
            for mode, fn in public_fns(a.groups).items():
                compiled = fn.lower(q, k, v, do).compile()
                n_l2 = compiled.as_text().count("custom_call_target=\"jca_l2norm")
                ms = bench(compiled, (q, k, v, do))
                results.append(dict(what="public", impl="fused" if fused == "1" else "xla",
                                    mode=mode, shape=shape, groups=a.groups, dtype=a.dtype,
                                    ms=ms, l2norm_custom_calls=n_l2, card=card))
        os.environ.pop("JCA_FUSED_L2NORM", None)

    lines = [f"card: {card}, dtype {a.dtype}, groups {a.groups}, JCA_L2NORM_ROWS={rows_env}",
             "| what | shape | mode | XLA l2norm ms | fused ms | speed-up | fused GB/s | kernels XLA/fused |",
             "|---|---|---|---|---|---|---|---|"]
    idx = {(r["what"], r["shape"], r["mode"], r["impl"]): r for r in results}
    for (what, shape, mode, impl), r in idx.items():
        if impl != "fused":
            continue
        base = idx[(what, shape, mode, "xla")]
        gb = f"{r['gbps']:.0f}" if "gbps" in r else ""
        kn = f"{base['kernels']}/{r['kernels']}" if "kernels" in r else ""
        lines.append(f"| {what} | {'x'.join(map(str, shape))} | {mode} | {base['ms']:.4f} | "
                     f"{r['ms']:.4f} | {base['ms'] / r['ms']:.2f}x | {gb} | {kn} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    for r in results:
        if r["what"] == "l2norm" and r["impl"] == "xla":
            print("XLA", r["mode"], "x".join(map(str, r["shape"])), "fusion kinds:", r["fusion_kinds"])
    with open(os.path.join(a.out, f"bench_l2norm_{a.dtype}.json"), "w") as fh:
        json.dump(dict(card=card, jax=jax.__version__, argv=sys.argv[1:], results=results), fh,
                  indent=1)
    with open(os.path.join(a.out, f"bench_l2norm_{a.dtype}.md"), "w") as fh:
        fh.write(table + "\n")


if __name__ == "__main__":
    main()
