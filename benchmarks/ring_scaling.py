"""Sequence-parallel scaling: ring attention vs the all-gather behaviour, on 1, 2 and 4 GPUs.

  python -P benchmarks/ring_scaling.py [--seqs 65536 131072 262144] [--devices 1 2 4]
        [--modes ring zigzag allgather] [--causal both|yes|no] [--iters 3] [--warmup 1]
        [--out-json ring_scaling.json] [--out-md ring_scaling.md] [--append]
  python benchmarks/ring_scaling.py --merge run1.json run2.json --out-json all.json --out-md all.md

One fwd+bwd step = jax.grad of sum(cosine_sim_attention(q, k, v)) w.r.t. q, k, v (l2norm
included), B=1, H=16 heads, D=128, bf16, q/k/v sharded on the sequence axis over n devices.

Modes (each runs in its own subprocess, so memory and the JCA_RING switch are clean):
  single     n = 1: plain cosine_sim_attention on one device (the baseline)
  ring       plain cosine_sim_attention under jit, inputs NamedSharding-sharded on the sequence:
             the custom_partitioning hook lowers it to ring attention (contiguous layout)
  zigzag     ring_cosine_sim_attention(layout="zigzag") (causal only; inputs already in
             zig-zag order, as a training pipeline would feed them)
  allgather  the same call as `ring` with JCA_RING=0: the sequence is all-gathered and every
             device computes the whole attention (the behaviour before ring attention)

Time per step is the median of `--iters` device-synchronised steps after `--warmup` steps; a
configuration that fails (e.g. out of memory) is recorded with its error and the larger sizes
of that configuration are skipped. "max N" is the largest sequence that ran. Peak memory is the
largest `peak_bytes_in_use` over the devices used (needs XLA_PYTHON_CLIENT_PREALLOCATE=false,
which this script sets).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

B, H, D = 1, 16, 128


def worker(args):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_cosine_attention as jca
    from jax_cosine_attention import _cuda

    n = args.n
    devices = jax.devices()[:n]
    if len(devices) < n:
        print(json.dumps({"error": f"only {len(devices)} devices"}))
        return
    mesh = jax.make_mesh((n,), ("sp",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    sh = NamedSharding(mesh, P(None, "sp", None, None))
    out = {"mode": args.mode, "n": n, "device": devices[0].device_kind,
           "cuda_kernel": bool(_cuda.AVAILABLE), "runs": []}
    failed = set()
    for causal in args.causal_list:  # "yes" / "no"
        for N in args.seqs:
            if causal in failed:
                out["runs"].append({"N": N, "causal": causal, "skipped": True})
                continue
            rec = {"N": N, "causal": causal}
            try:
                rec.update(run_one(jax, jnp, jca, mesh, sh, args, N, causal == "yes", devices))
            except Exception as e:  # noqa: BLE001 - record OOM and friends, go on
                msg = f"{type(e).__name__}: {e}"
                rec["error"] = msg[:400]
                rec["oom"] = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
                failed.add(causal)
            out["runs"].append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
            jax.clear_caches()
    print(json.dumps(out))


def run_one(jax, jnp, jca, mesh, sh, args, N, causal, devices):
    shape = (B, N, H, D)
    make = jax.jit(lambda key: jax.random.normal(key, shape, jnp.bfloat16), out_shardings=sh)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (make(kk) for kk in keys)

    if args.mode == "zigzag":
        attn = jca.ring_cosine_sim_attention(mesh, "sp", layout="zigzag", is_causal=causal)
    else:
        attn = lambda q, k, v: jca.cosine_sim_attention(q, k, v, is_causal=causal)

    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    compiled = step.lower(q, k, v).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - t0)
    peak = None
    try:
        peak = max(d.memory_stats().get("peak_bytes_in_use", 0) for d in devices)
    except Exception:  # noqa: BLE001 - not every backend has memory stats
        pass
    ms = statistics.median(times) * 1e3
    flops = 3.5 * 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    return {"ms": round(ms, 2), "times_ms": [round(t * 1e3, 2) for t in times],
            "compile_s": round(compile_s, 1), "tflops_per_device": round(flops / ms / 1e9 / len(devices), 1),
            "peak_gib": None if peak is None else round(peak / 2**30, 2),
            "collective_permutes": text.count("collective-permute-start") or text.count("collective-permute("),
            "all_gathers": text.count("all-gather-start") or text.count("all-gather("),
            "uses_kernel": "jca_cosattn" in text}


def driver(args):
    # Count devices in a throwaway process: the workers own the GPUs, one at a time.
    probe = subprocess.run([sys.executable, "-P", "-c", "import jax, json; d = jax.devices(); "
                            "print(json.dumps([len(d), d[0].device_kind]))"],
                           capture_output=True, text=True, check=True)
    ndev, kind = json.loads(probe.stdout.strip().splitlines()[-1])
    plans = []
    for n in args.devices:
        if n > ndev:
            print(f"skipping n={n}: {ndev} devices visible", file=sys.stderr)
            continue
        if n == 1:
            plans.append(("single", 1))
            continue
        for mode in args.modes:
            if mode == "zigzag" and args.causal == "no":
                continue
            plans.append((mode, n))
    results = {"device_kind": kind, "visible_devices": ndev, "B": B, "H": H, "D": D,
               "peak_per_causal_process": True,
               "dtype": "bfloat16", "seqs": args.seqs, "configs": [],
               "latency_hiding_scheduler": bool(args.lhs)}
    if args.append and os.path.exists(args.out_json):  # add to an earlier (partial) run
        with open(args.out_json) as f:
            old = json.load(f)
        if old.get("device_kind") != kind:
            print(f"--append: {args.out_json} was measured on {old.get('device_kind')}, this "
                  f"is {kind}: starting afresh", file=sys.stderr)
        else:
            redo = set(plans)
            results["configs"] = [c for c in old["configs"] if (c["mode"], c["n"]) not in redo]
            results["seqs"] = sorted(set(old["seqs"]) | set(args.seqs))
    for mode, n in plans:
        causal = {"both": ["no", "yes"], "yes": ["yes"], "no": ["no"]}[args.causal]
        if mode == "zigzag":
            causal = ["yes"]
        env = dict(os.environ, JCA_RING="0" if mode == "allgather" else "1")
        if args.lhs:  # let XLA overlap the K/V collective-permutes with the block compute
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                " --xla_gpu_enable_latency_hiding_scheduler=true").strip()
        t0 = time.perf_counter()
        rec = None
        # One process per causal value: peak_bytes_in_use never resets within a process.
        for c in causal:
            part = run_worker(args, env, mode, n, c)
            if rec is None:
                rec = part
            else:
                rec["runs"] += part.get("runs", [])
                if "error" in part:
                    rec["error"] = part["error"]
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        results["configs"].append(rec)
        with open(args.out_json, "w") as f:  # keep partial results if a later config dies
            json.dump(results, f, indent=1)
    md = markdown(results)
    with open(args.out_md, "w") as f:
        f.write(md)
    print(md)


def run_worker(args, env, mode, n, causal):
    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--worker", "--mode", mode,
           "--n", str(n), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--causal-list", causal, "--seqs", *map(str, args.seqs)]
    print(f"== {mode} n={n} causal={causal}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    sys.stderr.write(proc.stderr[-3000:])
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"mode": mode, "n": n, "error": f"worker rc={proc.returncode}",
                "stderr_tail": proc.stderr[-2000:], "runs": []}


def markdown(results):
    order = {"single": 0, "ring": 1, "zigzag": 2, "allgather": 3}
    results["configs"].sort(key=lambda c: (c["n"], order.get(c["mode"], 9)))
    cols = [(c["mode"], c["n"]) for c in results["configs"]]
    by = {(c["mode"], c["n"]): {(r["N"], r["causal"]): r for r in c.get("runs", [])}
          for c in results["configs"]}
    lines = [f"Ring attention scaling on {results['device_kind']} "
             f"(B={results['B']}, H={results['H']}, D={results['D']}, bf16, fwd+bwd step in ms, "
             f"(speed-up vs one device), [peak GiB per device])", ""]
    head = "| N | causal | " + " | ".join(f"{m} x{n}" for m, n in cols) + " |"
    lines += [head, "|" + "---|" * (2 + len(cols))]
    for causal in ("no", "yes"):
        for N in results["seqs"]:
            cells = []
            any_cell = False
            for col in cols:
                r = by[col].get((N, causal))
                if r is None:
                    cells.append("")
                    continue
                any_cell = True
                if "ms" in r:
                    peak = f" [{r['peak_gib']}]" if r.get("peak_gib") is not None else ""
                    base = by.get(("single", 1), {}).get((N, causal), {}).get("ms")
                    speed = f" ({base / r['ms']:.2f}x)" if base and col != ("single", 1) else ""
                    cells.append(f"{r['ms']:.0f}{speed}{peak}")
                elif r.get("skipped"):
                    cells.append("-")
                else:
                    cells.append("OOM" if r.get("oom") else "error")
            if any_cell:
                lines.append(f"| {N} | {causal} | " + " | ".join(cells) + " |")
    for causal in ("no", "yes"):
        cells = []
        for col in cols:
            ok = [N for (N, c), r in by[col].items() if c == causal and "ms" in r]
            tried = [N for (N, c) in by[col] if c == causal]
            cells.append(str(max(ok)) if ok else ("none" if tried else ""))
        if any(cells):
            lines.append(f"| max N | {causal} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("single = 1 device; ring = cosine_sim_attention with sequence-sharded inputs "
                 "(ring hook, contiguous layout); zigzag = ring_cosine_sim_attention(layout="
                 "'zigzag'); allgather = same call with JCA_RING=0.")
    if not results.get("peak_per_causal_process"):
        lines.append("Peak GiB is the running peak of one process that ran the non-causal sizes "
                     "first: causal peaks are upper bounds (the causal step needs no more "
                     "memory than the non-causal one of the same N).")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072, 262144])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", default=["ring", "zigzag", "allgather"],
                    choices=["ring", "zigzag", "allgather"])
    ap.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=1800, help="per worker, seconds")
    ap.add_argument("--out-json", default="ring_scaling.json")
    ap.add_argument("--out-md", default="ring_scaling.md")
    ap.add_argument("--no-lhs", dest="lhs", action="store_false",
                    help="do not add --xla_gpu_enable_latency_hiding_scheduler=true to XLA_FLAGS")
    ap.add_argument("--append", action="store_true",
                    help="merge into an existing --out-json (same device kind), e.g. to split "
                         "the run over several commands; the markdown covers all of it")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="run nothing: combine earlier --out-json files (later files win for "
                         "the same mode and device count) into --out-json / --out-md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--causal-list", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    elif args.merge:
        merge(args)
    else:
        driver(args)


def merge(args):
    merged = None
    for path in args.merge:
        with open(path) as f:
            res = json.load(f)
        if merged is None:
            merged = res
            continue
        if res.get("device_kind") != merged.get("device_kind"):
            print(f"warning: {path} was measured on {res.get('device_kind')}, not "
                  f"{merged.get('device_kind')}", file=sys.stderr)
        new = {(c["mode"], c["n"]) for c in res["configs"]}
        merged["configs"] = [c for c in merged["configs"] if (c["mode"], c["n"]) not in new]
        merged["configs"] += res["configs"]
        merged["seqs"] = sorted(set(merged["seqs"]) | set(res["seqs"]))
    with open(args.out_json, "w") as f:
        json.dump(merged, f, indent=1)
    md = markdown(merged)
    with open(args.out_md, "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
