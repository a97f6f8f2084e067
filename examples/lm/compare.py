"""--compare: loss and bits-per-byte curves of several runs in one PNG, plus a table.

Panels: train (smoothed) and validation loss vs step, validation bits per byte vs step, train
loss vs training time. The table (printed, and written next to the PNG as .md) has per run:
attention backend, parameters, steps, median step time, throughput (tokens/s), final train loss
(mean of the last 10 steps), final validation loss and bpb; for two runs, a short verdict on
speed and on the gap between their validation curves.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .train_loop import read_metrics, summarize  # noqa: E402


def _smooth(y, n):
    if len(y) < 2 * n or n <= 1:
        return np.asarray(y)
    k = np.ones(n) / n
    return np.convolve(y, k, mode="valid")


def table(run_dirs, labels):
    head = ("| run | attention | backend | params | steps | step time (ms) | tokens/s | train loss "
            "| val loss | val bpb |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for d, lab in zip(run_dirs, labels):
        s = summarize(d)
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        fmt = lambda v, p=4: "—" if v is None else f"{v:.{p}f}"
        rows.append(f"| {lab} | {cfg['attention']} | {s['attention_backend'].split(' ')[0]} "
                    f"| {s['n_params'] / 1e6:.1f}M | {s['steps']} | {s['step_time_s'] * 1e3:.1f} "
                    f"| {s['tokens_per_s']:,.0f} | {fmt(s['final_train_loss'])} "
                    f"| {fmt(s['final_val_loss'])} | {fmt(s['final_val_bpb'])} |")
    return head + "\n".join(rows) + "\n"


def verdict(run_dirs, labels):
    """Two runs: a few sentences on speed and on how closely the losses agree."""
    (a, b), (la, lb) = run_dirs, labels
    sa, sb = summarize(a), summarize(b)
    fast, slow = sorted([(sa["step_time_s"], la, sa), (sb["step_time_s"], lb, sb)],
                        key=lambda t: t[0])
    lines = [f"Speed: {fast[1]} was faster per step, {fast[0] * 1e3:.1f} ms vs "
             f"{slow[0] * 1e3:.1f} ms ({slow[0] / fast[0]:.2f}x; {fast[2]['tokens_per_s']:,.0f} vs "
             f"{slow[2]['tokens_per_s']:,.0f} tokens/s)."]
    ev = [{r["step"]: r["val_bpb"] for r in read_metrics(d) if r["kind"] == "eval"}
          for d in (a, b)]
    shared = sorted(set(ev[0]) & set(ev[1]))
    if shared:
        last = shared[-1]
        d = ev[0][last] - ev[1][last]
        gap, at = max((abs(ev[0][s] - ev[1][s]), s) for s in shared)
        lines.append(f"Loss: at step {last} the validation bits per byte are {ev[0][last]:.4f} "
                     f"({la}) vs {ev[1][last]:.4f} ({lb}), a difference of {d:+.4f} bpb "
                     f"({100 * d / ev[1][last]:+.2f}%); the largest gap over the {len(shared)} "
                     f"shared evaluations is {gap:.4f} bpb at step {at}.")
    if sa["steps"] != sb["steps"]:
        lines.append(f"Note: the runs stopped at different steps ({sa['steps']} vs {sb['steps']}).")
    return "\n".join(lines) + "\n"


def compare(run_dirs, out_png, labels=None):
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    fig, (ax_loss, ax_bpb, ax_time) = plt.subplots(1, 3, figsize=(17, 4.5))
    for d, lab in zip(run_dirs, labels):
        recs = read_metrics(d)
        tr = [r for r in recs if r["kind"] == "train"]
        ev = [r for r in recs if r["kind"] == "eval"]
        n = max(1, len(tr) // 50)
        steps = np.array([r["step"] for r in tr])
        loss = _smooth([r["loss"] for r in tr], n)
        line, = ax_loss.plot(steps[len(steps) - len(loss):], loss, label=f"{lab} (train)")
        clock = np.cumsum([r["step_time"] for r in tr])   # training time, compile excluded
        ax_time.plot(clock[len(clock) - len(loss):], loss, color=line.get_color(), label=lab)
        if ev:
            ax_loss.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o--",
                         color=line.get_color(), ms=3, label=f"{lab} (val)")
            ax_bpb.plot([r["step"] for r in ev], [r["val_bpb"] for r in ev], "o-",
                        color=line.get_color(), ms=3, label=lab)
    ax_loss.set(xlabel="step", ylabel="loss (nats/byte)", title="training / validation loss")
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    ax_time.set(xlabel="training time (s)", ylabel="train loss (nats/byte)",
                title="training loss vs time")
    for ax in (ax_loss, ax_bpb, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    md = table(run_dirs, labels)
    if len(run_dirs) == 2:
        md += "\n" + verdict(run_dirs, labels)
    with open(os.path.splitext(out_png)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {out_png}")
    return md
