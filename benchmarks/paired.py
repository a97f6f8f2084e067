"""Paired speed-up of our paths over a baseline: the paths alternate sample by sample, so the
card's clock drift (which moves whole rounds of bench.py by up to 18 %) hits both sides of each
ratio alike.

  python -P benchmarks/paired.py [--causal] [--modes fwd fwd+bwd] [--dims 64 128]
                                 [--seqs 4096 16384] [--pairs 15] [--lead-ms 250] [--out DIR]

For each (D, N, mode) every path is compiled and warmed up, then timed in --pairs rounds; a round
times one sample of each path (≈ 20 ms of back-to-back calls, device-synchronised), in an order
that reverses every round. An H100 under these loads runs at its power cap, and a sample's clock
depends on what ran just before it (a path measured right after a low-power one ran ≈ 10 %
faster); so each sample is preceded by --lead-ms of untimed calls of the same path, and measures
the path in its own steady state (--lead-ms 0: plain alternation). The speed-up of a path is the
median over rounds of baseline sample / path sample, with a 95 % bootstrap interval of that
median; a path is faster than the baseline only where the whole interval lies above 1. Paths and
inputs are bench.py's; each sample's start time (time.time()) is kept in the JSON, to be joined
with a clock / power log.
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # bench.py (python -P drops it)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import error_text, flops, l2n, make_fn, write_table  # noqa: E402


def sample_ms(fn, args, inner, lead):
    for _ in range(lead):
        out = fn(*args)
    if lead:
        jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(inner):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / inner * 1e3


def bootstrap_median(x, rng, n=2000, level=0.95):
    x = np.asarray(x)
    meds = np.median(x[rng.integers(0, len(x), (n, len(x)))], axis=1)
    lo, hi = np.quantile(meds, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def speedup_text(r):
    if "speedup" not in r:
        return "baseline"
    return f"{r['speedup']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def row_text(r):
    if "error" in r:
        return f"D={r['D']} N={r['N']} {r['mode']} {r['path']}: {r['error'][:60]}"
    return f"D={r['D']} N={r['N']} {r['mode']} {r['path']} {r['ms']:.3f} ms {speedup_text(r)}"


def run_config(paths, mode, causal, shape, dtype, pairs, rng, baseline, lead_ms):
    q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(4))
    qn, kn = l2n(q), l2n(k)
    fns, errors = {}, {}
    for p in paths:
        args = (qn, kn, v, do) if p.startswith("kernel") else (q, k, v, do)
        try:
            fn = make_fn(p, mode, causal).lower(*args).compile()
            jax.block_until_ready(fn(*args))
        except Exception as e:  # noqa: BLE001  (e.g. Pallas has no causal backward)
            if p == baseline:
                raise
            errors[p] = error_text(e)
            continue
        one = max(sample_ms(fn, args, 1, 0), 1e-3)
        fns[p] = (fn, args, max(1, min(50, int(20.0 / one))), int(lead_ms / one))
    paths = [p for p in paths if p in fns]
    samples = {p: [] for p in paths}
    starts = {p: [] for p in paths}
    for r in range(pairs):
        for p in (paths if r % 2 == 0 else paths[::-1]):
            fn, args, inner, lead = fns[p]
            starts[p].append(time.time())
            samples[p].append(sample_ms(fn, args, inner, lead))
    out = {}
    for p in paths:
        rec = dict(ms=statistics.median(samples[p]), samples_ms=samples[p], starts=starts[p])
        if p != baseline:
            ratios = [b / t for b, t in zip(samples[baseline], samples[p])]
            lo, hi = bootstrap_median(ratios, rng)
            rec.update(speedup=statistics.median(ratios), ci95=[lo, hi])
        out[p] = rec
    out.update({p: dict(error=e) for p, e in errors.items()})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--paths", nargs="+", default=["cuda", "kernel", "cudnn"])
    ap.add_argument("--baseline", default="cudnn")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--lead-ms", type=float, default=250.0,
                    help="untimed calls of the same path before each sample (0: none)")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    if a.baseline not in a.paths:
        ap.error(f"--baseline {a.baseline} must be one of --paths {a.paths}")

    dtype = jnp.bfloat16 if a.dtype == "bf16" else jnp.float16
    card = getattr(jax.devices()[0], "device_kind", str(jax.devices()[0]))
    rng = np.random.default_rng()
    rows = []
    for D in a.dims:
        for N in a.seqs:
            for mode in a.modes:
                res = run_config(a.paths, mode, a.causal, (a.batch, N, a.heads, D), dtype,
                                 a.pairs, rng, a.baseline, a.lead_ms)
                for p, rec in res.items():
                    if "ms" in rec:
                        rec["tflops"] = (flops(a.batch, a.heads, N, N, D, a.causal, mode)
                                         / (rec["ms"] * 1e-3) / 1e12)
                    rows.append(dict(rec, path=p, mode=mode, D=D, N=N, B=a.batch, H=a.heads,
                                     causal=a.causal, dtype=a.dtype, card=card))
                print(" | ".join(row_text(r) for r in rows[-len(res):]), flush=True)

    os.makedirs(a.out, exist_ok=True)
    tag = f"paired_{a.dtype}{'_causal' if a.causal else ''}{'_lead0' if a.lead_ms == 0 else ''}"
    with open(os.path.join(a.out, f"{tag}.json"), "w") as fh:
        json.dump(dict(card=card, jax=jax.__version__, argv=sys.argv[1:], rows=rows), fh, indent=1)
    lines = [f"card: {card}, {a.dtype}, causal {a.causal}, B={a.batch} H={a.heads}, "
             f"{a.pairs} alternating pairs, {a.lead_ms:g} ms lead-in per sample; "
             f"speed-up = {a.baseline} / path, median [95 % CI]",
             "| D | N | mode | path | ms (median) | TFLOP/s | speed-up |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['D']} | {r['N']} | {r['mode']} | {r['path']} | {r['error'][:60]} | | |")
            continue
        lines.append(f"| {r['D']} | {r['N']} | {r['mode']} | {r['path']} | {r['ms']:.3f} "
                     f"| {r['tflops']:.0f} | {speedup_text(r)} |")
    write_table(lines, os.path.join(a.out, f"{tag}.md"))


if __name__ == "__main__":
    main()
