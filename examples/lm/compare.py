"""--compare: loss and bits-per-byte curves of several runs in one PNG, plus a table.

Panels: train (smoothed) and validation loss vs step, validation bits per byte vs step, train
loss vs training time. The table (printed, and written next to the PNG as .md) has per run:
attention backend, parameters, steps, median step time, throughput (tokens/s), final train loss
(mean of the last 10 steps), final validation loss and bpb.
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
    with open(os.path.splitext(out_png)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {out_png}")
    return md
