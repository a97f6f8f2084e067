"""Benchmark of the fused CUDA cosine-sim attention against the JAX baselines, in one process.

  python benchmarks/bench.py [--only-forwards | --only-backwards] [--causal] [--dtype bf16]
                             [--dims 64 128] [--seqs 1024 4096 16384] [--long 65536] [--out DIR]

Paths (all include the l2norm of q and k, scale 10):
  cuda        this library, implementation="cuda"
  kernel      the raw FFI kernels on pre-normalised q, k (no l2norm, no dq = scale*dq_acc); on an
              sm_90 device they take the sm_90a (TMA + wgmma) kernels where those apply
  kernel_sm80 the same with the portable sm_80 kernels forced (A/B against `kernel`)
  kernel_fused `kernel` with the opt-in fused-dQ sm_90a backward (fused_dq=True) instead of the dQ
              kernel + plain dK/dV kernel
  cudnn       jax.nn.dot_product_attention(l2norm(q)*scale, l2norm(k), v, scale=1, implementation="cudnn")
  xla_plain   plain XLA cosine-sim attention (dense softmax)
  pallas_mgpu jax.experimental.pallas.ops.gpu.attention_mgpu (Hopper Mosaic GPU kernel) on
              l2norm(q)*scale, l2norm(k) in float16 (it runs f16; no causal backward)
  xla_lib     this library, implementation="xla" (blockwise)
FLOPs (FlashAttention convention): fwd = 4*B*H*T*S*D (halved when causal), bwd = 2.5 fwd,
fwd+bwd = 3.5 fwd. Times are medians of 5 batches of back-to-back calls (device-synchronised);
the paths of one size and mode are compiled first, then timed in --rounds interleaved rounds
(rotating order), and the median of the rounds is reported (each round's time in the JSON).
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **_):
        return x

import jax_cosine_attention as jca  # noqa: E402
from jax_cosine_attention import _cuda  # noqa: E402

SCALE = 10.0


def l2n(x):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.maximum(jnp.sum(xf * xf, -1, keepdims=True), 1e-12))).astype(x.dtype)


def plain_xla(q, k, v, causal):
    qn, kn = l2n(q), l2n(k)
    s = jnp.einsum("btnh,bsnh->bnts", qn, kn, preferred_element_type=jnp.float32) * SCALE
    if causal:
        T, S = q.shape[1], k.shape[1]
        s = jnp.where(jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + S - T, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


def make_fwd(path, causal):
    if path == "cuda":
        return lambda q, k, v: jca.cosine_sim_attention(q, k, v, scale=SCALE, is_causal=causal,
                                                        implementation="cuda")
    if path == "xla_lib":
        return lambda q, k, v: jca.cosine_sim_attention(q, k, v, scale=SCALE, is_causal=causal,
                                                        implementation="xla")
    if path == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(
            (l2n(q).astype(jnp.float32) * SCALE).astype(q.dtype), l2n(k), v, scale=1.0,
            is_causal=causal, implementation="cudnn")
    if path == "xla_plain":
        return lambda q, k, v: plain_xla(q, k, v, causal)
    if path == "pallas_mgpu":
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mg
        cfg = mg.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal,
                              block_q_dq=64, block_kv_dq=128, block_q_dkv=64, block_kv_dkv=128)
        f16 = jnp.float16
        return lambda q, k, v: mg.attention(
            (l2n(q).astype(jnp.float32) * SCALE).astype(f16), l2n(k).astype(f16), v.astype(f16),
            cfg).astype(q.dtype)
    if path in ("kernel", "kernel_sm80", "kernel_fused"):  # inputs pre-normalised by the caller
        def f(q, k, v):
            sc = jnp.full((q.shape[2],), SCALE, jnp.float32)
            return _cuda.fwd(q, k, v, sc, None, None, None, None, causal=causal, groups=1,
                             bounded=True, sm90=path != "kernel_sm80")[0]
        return f
    raise ValueError(path)


def make_fn(path, mode, causal):
    if path in ("kernel", "kernel_sm80", "kernel_fused") and mode == "fwd+bwd":
        def fb(q, k, v, do):
            sc = jnp.full((q.shape[2],), SCALE, jnp.float32)
            o, lse = _cuda.fwd(q, k, v, sc, None, None, None, None, causal=causal, groups=1,
                               bounded=True, sm90=path != "kernel_sm80")
            return _cuda.bwd(do, q, k, v, o, lse, sc, None, None, None, None, causal=causal,
                             groups=1, bounded=True, need_dbias=False,
                             deterministic=False, sm90=path != "kernel_sm80",
                             fused_dq=path == "kernel_fused")[:3]
        return jax.jit(fb)
    fwd = make_fwd(path, causal)
    if mode == "fwd":
        return jax.jit(lambda q, k, v, do: fwd(q, k, v))

    def loss(q, k, v, do):
        return jnp.sum(fwd(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def bench(fn, args, budget_s=1.5):
    out = jax.block_until_ready(fn(*args))  # warm-up (compiled already)
    del out
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    inner = max(1, min(50, int(0.03 / max(one, 1e-6))))
    batches = max(3, min(5, int(budget_s / max(one * inner, 1e-6))))
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) * 1e3


def error_text(e):
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return "OOM" if ("RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()) else msg


def flops(B, H, T, S, D, causal, mode):
    f = 4.0 * B * H * T * S * D * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "fwd+bwd": 3.5, "bwd": 2.5}[mode]


def write_table(lines, path):
    """Prints a markdown table (its lines) and writes it to path."""
    table = "\n".join(lines)
    print(table)
    with open(path, "w") as fh:
        fh.write(table + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--only-forwards", action="store_true")
    g.add_argument("--only-backwards", action="store_true", help="only fwd+bwd (bwd not derived)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--long", type=int, nargs="*", default=[65536],
                    help="extra lengths run with B=1 (fused paths + cudnn only)")
    ap.add_argument("--paths", nargs="+", default=["cuda", "kernel", "cudnn", "xla_plain", "xla_lib"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timing rounds per (size, mode), paths interleaved in a rotating order")
    a = ap.parse_args(argv)

    dtype = jnp.bfloat16 if a.dtype == "bf16" else jnp.float16
    modes = ["fwd"] if a.only_forwards else (["fwd+bwd"] if a.only_backwards else ["fwd", "fwd+bwd"])
    dev = jax.devices()[0]
    card = getattr(dev, "device_kind", str(dev))
    print(f"card: {card}; jax {jax.__version__}; cuda kernels available: {_cuda.AVAILABLE}; "
          f"sm_90a forward built: {_cuda.SM90_BUILT}", flush=True)

    configs = []
    for D in a.dims:
        for N in a.seqs:
            configs.append((a.batch, N, D, a.paths))
        for N in a.long:
            configs.append((1, N, D, [p for p in a.paths
                                      if p in ("cuda", "kernel", "kernel_sm80", "kernel_fused", "cudnn")]))
    jobs = [(B, N, D, p, m) for (B, N, D, paths) in configs for m in modes for p in paths]

    results = []
    rng = np.random.default_rng(0)
    cache = {}
    groups = {}  # (B, N, D, mode) -> paths: compiled together, then timed in interleaved rounds
    for (B, N, D, path, mode) in jobs:
        groups.setdefault((B, N, D, mode), []).append(path)
    for (B, N, D, mode), paths in tqdm(groups.items(), desc="bench", file=sys.stdout, mininterval=5):
        key = (B, N, D)
        if key not in cache:
            cache.clear()
            shp = (B, N, a.heads, D)
            q, k, v, do = (jnp.asarray(rng.standard_normal(shp, np.float32), dtype) for _ in range(4))
            cache[key] = (q, k, v, do, l2n(q), l2n(k))
        q, k, v, do, qn, kn = cache[key]
        ready = []
        for path in paths:
            args = (qn, kn, v, do) if path.startswith("kernel") else (q, k, v, do)
            rec = dict(path=path, mode=mode, B=B, H=a.heads, T=N, S=N, D=D, causal=a.causal,
                       dtype=a.dtype, card=card)
            results.append(rec)
            try:
                compiled = make_fn(path, mode, a.causal).lower(*args).compile()
                try:
                    ma = compiled.memory_analysis()
                    rec["temp_bytes"] = int(ma.temp_size_in_bytes)
                    rec["out_bytes"] = int(ma.output_size_in_bytes)
                except Exception:  # noqa: BLE001
                    pass
                ready.append((rec, compiled, args))
            except Exception as e:  # noqa: BLE001  (unsupported, ...)
                rec["error"] = error_text(e)
        # Rounds in a rotating path order, so that no path always runs first after the compiles
        # (idle card) or last; the reported time is the median of the rounds' medians.
        for r in range(a.rounds):
            k = r % len(ready) if ready else 0
            for rec, compiled, args in ready[k:] + ready[:k]:
                if "error" in rec:
                    continue
                try:
                    rec.setdefault("ms_rounds", []).append(bench(compiled, args))
                except Exception as e:  # noqa: BLE001  (OOM, ...)
                    rec["error"] = error_text(e)
        for rec, _, _ in ready:
            if "error" in rec:
                rec.pop("ms_rounds", None)
                continue
            rec["ms"] = statistics.median(rec["ms_rounds"])
            rec["tflops"] = flops(B, a.heads, N, N, D, a.causal, mode) / (rec["ms"] * 1e-3) / 1e12

    # bwd = (fwd+bwd) - fwd
    if "fwd" in modes and "fwd+bwd" in modes:
        idx = {(r["path"], r["mode"], r["B"], r["T"], r["D"]): r for r in results}
        for r in list(results):
            if r["mode"] != "fwd+bwd" or "ms" not in r:
                continue
            f = idx.get((r["path"], "fwd", r["B"], r["T"], r["D"]))
            if f and "ms" in f and r["ms"] > f["ms"]:
                ms = r["ms"] - f["ms"]
                results.append(dict(r, mode="bwd", ms=ms, temp_bytes=None, ms_rounds=None,
                                    tflops=flops(r["B"], r["H"], r["T"], r["S"], r["D"], a.causal, "bwd") / (ms * 1e-3) / 1e12))

    os.makedirs(a.out, exist_ok=True)
    tag = f"{a.dtype}{'_causal' if a.causal else ''}"
    jpath = os.path.join(a.out, f"bench_{tag}.json")
    with open(jpath, "w") as fh:
        json.dump(dict(card=card, jax=jax.__version__, argv=sys.argv[1:], results=results), fh, indent=1)

    # table
    lines = [f"card: {card}, dtype {a.dtype}, causal {a.causal}, H={a.heads}",
             "| D | B | N | mode | path | ms | rounds spread | TFLOP/s | cuda speed-up | temp MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    idx = {(r["path"], r["mode"], r["B"], r["T"], r["D"]): r for r in results}
    for r in sorted(results, key=lambda r: (r["D"], r["B"], r["T"], ["fwd", "bwd", "fwd+bwd"].index(r["mode"]), r["path"])):
        ours = idx.get(("cuda", r["mode"], r["B"], r["T"], r["D"]))
        sp = ""
        if ours and "ms" in ours and "ms" in r and r["path"] != "cuda":
            sp = f"{r['ms'] / ours['ms']:.2f}x"
        ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")[:40]
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        tm = f"{r['temp_bytes'] / 2**20:.0f}" if r.get("temp_bytes") is not None else ""
        rounds = r.get("ms_rounds") or []
        spread = (f"{100 * (max(rounds) - min(rounds)) / r['ms']:.1f} %" if len(rounds) > 1 else "")
        lines.append(f"| {r['D']} | {r['B']} | {r['T']} | {r['mode']} | {r['path']} | {ms} | {spread} | {tf} "
                     f"| {sp} | {tm} |")
    write_table(lines, os.path.join(a.out, f"bench_{tag}.md"))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        pmodes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in results)]
        fig, axes = plt.subplots(len(a.dims), len(pmodes), figsize=(5 * len(pmodes), 3.6 * len(a.dims)),
                                 squeeze=False)
        for i, D in enumerate(a.dims):
            for j, m in enumerate(pmodes):
                ax = axes[i][j]
                for p in a.paths:
                    pts = sorted((r["T"], r["tflops"]) for r in results
                                 if r["path"] == p and r["mode"] == m and r["D"] == D and "tflops" in r
                                 and r["B"] == a.batch)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=p)
                ax.set_xscale("log", base=2)
                ax.set_title(f"D={D} {m} ({a.dtype}{', causal' if a.causal else ''})")
                ax.set_xlabel("sequence length")
                ax.set_ylabel("TFLOP/s")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"{card}, B={a.batch}, H={a.heads}")
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, f"bench_{tag}.png"), dpi=110)
    except Exception as e:  # noqa: BLE001
        print("plot skipped:", e)
    print("wrote", jpath)


if __name__ == "__main__":
    main()
