"""Side by side: warp-stall samples and pipe / shared-memory utilisation of one kernel profiled in
several builds or paths (the <name>_raw.csv[.gz] files of scripts/ncu_profile.sh, which
scripts/gpu_ncu_experiments.sh, gpu_ncu_backward.sh and gpu_ncu_cudnn.sh call).

  python benchmarks/ncu_compare.py results/.../tree_raw.csv.gz results/.../other_raw.csv.gz
"""
import csv
import gzip
import os
import re
import sys

ROWS = [  # (label, metric name regex)
    ("duration", r"gpu__time_duration\.sum$"),
    ("tensor pipe active", r"sm__pipe_tensor_cycles_active\.avg\.pct_of_peak_sustained_elapsed$"),
    ("issue slots busy", r"sm__inst_issued\.avg\.pct_of_peak_sustained_elapsed$"),
    ("L1/smem wavefronts, shared",
     r"l1tex__data_pipe_lsu_wavefronts_mem_shared\.sum\.pct_of_peak_sustained_elapsed$"),
    ("smem bank reads", r"l1tex__data_bank_reads\.avg\.pct_of_peak_sustained_elapsed$"),
    ("smem bank writes", r"l1tex__data_bank_writes\.avg\.pct_of_peak_sustained_elapsed$"),
    ("shared loads", r"smsp__sass_inst_executed_op_shared_ld\.sum$"),
    ("shared stores", r"smsp__sass_inst_executed_op_shared_st\.sum$"),
]
STALL = re.compile(r"smsp__pcsamp_warps_issue_stalled_([a-z_]+)$")


def load(path):
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        rows = list(csv.reader(f))
    for i, r in enumerate(rows):
        if "Kernel Name" in r:  # header, units, then the (first) kernel's values
            return dict(zip(r, rows[i + 2])), dict(zip(r, rows[i + 1]))
    raise SystemExit(f"{path}: no 'Kernel Name' header (not an ncu --page raw --csv file)")


def num(s):
    try:
        return float(s.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def main(paths):
    loaded = [load(p) for p in paths]
    runs, units = [r for r, _ in loaded], loaded[0][1]
    names = [os.path.basename(p).split("_raw")[0] for p in paths]
    print("| metric | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, pat in ROWS:
        key = next((k for k in runs[0] if re.search(pat, k)), None)
        if key:
            unit = f" ({units[key]})" if units.get(key) else ""
            print(f"| {label}{unit} | " + " | ".join(f"{num(r.get(key)) or 0:.4g}" for r in runs)
                  + " |")
    stalls = sorted({m.group(1) for k in runs[0] for m in [STALL.match(k)] if m
                     and not m.group(1).endswith("not_issued")})
    totals = [sum(num(r.get(f"smsp__pcsamp_warps_issue_stalled_{s}")) or 0 for s in stalls)
              for r in runs]
    for s in stalls:
        vals = [num(r.get(f"smsp__pcsamp_warps_issue_stalled_{s}")) or 0 for r in runs]
        if max(v / t for v, t in zip(vals, totals) if t) >= 0.01:
            print(f"| stall: {s} (samples) | " + " | ".join(f"{v:.0f}" for v in vals) + " |")
    print("| stall samples, total | " + " | ".join(f"{t:.0f}" for t in totals) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
