"""SM clock and board power during each path's samples of a paired.py run: joins the samples'
start times in paired_*.json with an nvidia-smi log sampled every 100 ms
(`TZ=UTC nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,
clocks_throttle_reasons.active --format=csv,noheader,nounits -lms 100`, as gpu_final.sh's
paired step writes it to smi.csv).

  python benchmarks/paired_clocks.py DIR [--window-s 0.25]

Prints, per (mode, D, N, path), the median time and the median SM clock and power over the log
lines that fall in [start, start + window] of its samples (the lead-in and the sample).
"""
import argparse
import datetime
import glob
import json
import os
import statistics


def read_smi(path):
    rows = []
    for line in open(path):
        f = [x.strip() for x in line.split(",")]
        try:
            t = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f")
            rows.append((t.replace(tzinfo=datetime.timezone.utc).timestamp(), float(f[1]), float(f[2])))
        except (ValueError, IndexError):  # header or a line cut by the kill
            continue
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--window-s", type=float, default=0.25)
    a = ap.parse_args(argv)
    smi = read_smi(os.path.join(a.dir, "smi.csv"))
    print("| file | D | N | mode | path | ms | SM MHz | W |\n|---|---|---|---|---|---|---|---|")
    for fn in sorted(glob.glob(os.path.join(a.dir, "paired_*.json"))):
        for r in json.load(open(fn))["rows"]:
            if "starts" not in r:
                continue
            inside = [x for s in r["starts"] for x in smi if s <= x[0] <= s + a.window_s]
            mhz = statistics.median(x[1] for x in inside) if inside else float("nan")
            watts = statistics.median(x[2] for x in inside) if inside else float("nan")
            print(f"| {os.path.basename(fn)[:-5]} | {r['D']} | {r['N']} | {r['mode']} | {r['path']} "
                  f"| {r['ms']:.3f} | {mhz:.0f} | {watts:.0f} |")


if __name__ == "__main__":
    main()
