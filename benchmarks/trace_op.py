"""Where a timed fwd+bwd step's time goes on the GPU, from a jax.profiler trace (CUPTI), without
ncu's replay: per-kernel durations inside a back-to-back loop (as bench.py times it), the busy
time (union of kernel intervals) and the idle gaps between kernels.

  python -P benchmarks/trace_op.py --paths cuda cudnn --dims 128 --n 4096 [--causal] --out DIR

Writes DIR/trace_<path>_d<D>_n<N>[_causal].json (per-kernel rows, µs per step) and prints a table.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def gpu_kernel_events(trace_dir):
    """Complete events ('X') on the GPU device's streams of the perfetto trace in trace_dir."""
    path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", "")).upper()
                and "device" in str(e.get("args", {}).get("name", "")).lower()}
    stream_tids = {(e["pid"], e["tid"]) for e in events
                   if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in gpu_pids
                   and "stream" in str(e.get("args", {}).get("name", "")).lower()}
    if not stream_tids:  # a trace layout this parser does not know: say what it holds
        print("trace processes / threads:", sorted({str(e.get("args", {}).get("name")) for e in events
                                                    if e.get("ph") == "M"})[:40])
    return [e for e in events if e.get("ph") == "X" and (e["pid"], e.get("tid")) in stream_tids
            and e.get("dur", 0) > 0 and not str(e.get("name", "")).lower().startswith("memcpy")]


def union_length(intervals):
    total, end = 0.0, -1e30
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", nargs="+", default=["cuda", "cudnn"])
    ap.add_argument("--dims", type=int, nargs="+", default=[128])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/trace")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    B, H = 4, 16
    rng = np.random.default_rng(0)
    print("card:", jax.devices()[0].device_kind, "jax", jax.__version__)
    for D in a.dims:
        q, k, v, do = (jnp.asarray(rng.standard_normal((B, a.n, H, D), np.float32), jnp.bfloat16)
                       for _ in range(4))
        for path in a.paths:
            args = (bench.l2n(q), bench.l2n(k), v, do) if path.startswith("kernel") else (q, k, v, do)
            fn = bench.make_fn(path, "fwd+bwd", a.causal).lower(*args).compile()
            for _ in range(3):
                jax.block_until_ready(fn(*args))
            tmp = tempfile.mkdtemp()
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                t0 = time.perf_counter()
                for _ in range(a.iters):
                    out = fn(*args)
                jax.block_until_ready(out)
                wall = (time.perf_counter() - t0) / a.iters * 1e6
            ev = gpu_kernel_events(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if not ev:
                print(f"{path} D={D}: no GPU events in the trace")
                continue
            per = collections.defaultdict(list)
            for e in ev:
                per[e["name"]].append(e["dur"])
            span = max(e["ts"] + e["dur"] for e in ev) - min(e["ts"] for e in ev)
            busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in ev])
            rows = sorted(({"kernel": n, "calls_per_step": len(d) / a.iters,
                            "us_per_step": sum(d) / a.iters, "median_us": statistics.median(d)}
                           for n, d in per.items()), key=lambda r: -r["us_per_step"])
            rec = dict(path=path, D=D, N=a.n, causal=a.causal, iters=a.iters,
                       wall_us_per_step=wall, span_us_per_step=span / a.iters,
                       busy_us_per_step=busy / a.iters,
                       kernel_sum_us_per_step=sum(r["us_per_step"] for r in rows), kernels=rows)
            name = f"trace_{path}_d{D}_n{a.n}{'_causal' if a.causal else ''}.json"
            with open(os.path.join(a.out, name), "w") as f:
                json.dump(rec, f, indent=1)
            print(f"\n{path} D={D} N={a.n} causal={a.causal}: wall {wall:.0f} µs/step, GPU span "
                  f"{rec['span_us_per_step']:.0f}, busy {rec['busy_us_per_step']:.0f}, kernel sum "
                  f"{rec['kernel_sum_us_per_step']:.0f} (idle {rec['span_us_per_step'] - rec['busy_us_per_step']:.0f})")
            for r in rows:
                print(f"  {r['us_per_step']:8.1f} µs  x{r['calls_per_step']:.0f}  median {r['median_us']:7.1f}  "
                      f"{r['kernel'][:110]}")


if __name__ == "__main__":
    main()
