"""The training driver: data, mesh, state/resume, the loop, eval, samples, checkpoints, logs.

RUN_DIR (--out) gets config.json, meta.json (sizes, devices, versions, which attention
implementation actually ran), metrics.jsonl (one JSON object per line: kind=train|eval),
samples.jsonl, summary.json and checkpoints/ (orbax). Re-running with the same --out resumes
from the latest checkpoint; metrics past it are dropped so the log stays consistent.
"""

import functools
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jax_cosine_attention import cosine_sim_attention

from . import parallel
from .attention import softmax_implementation
from .checkpoint import Checkpointer, abstract_like
from .config import check_resumable
from .data import Batches, load_corpus
from .optim import schedule
from .sample import make_sampler, to_text
from .steps import Steps


def attention_backend(cfg):
    """What the training attention really runs on: 'cuda' (our kernel), 'cudnn' or 'xla'."""
    if cfg.attention == "softmax":
        return softmax_implementation(cfg.dtype, decode=False) or "xla"
    if cfg.attention == "cosine-xla":
        return "xla"
    dt = jnp.dtype(cfg.dtype)
    q = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len, cfg.heads, cfg.head_dim), dt)
    kv = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len, cfg.kv_heads, cfg.head_dim), dt)
    try:
        jax.eval_shape(functools.partial(cosine_sim_attention, is_causal=True, scale=cfg.scale,
                                         groups=cfg.l2norm_groups, implementation="cuda"), q, kv, kv)
        return "cuda"
    except ValueError as e:
        return f"xla (kernel unavailable: {e})"


def _versions():
    import flax
    import optax
    import orbax.checkpoint as ocp
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax": getattr(ocp, "__version__", "?"), "python": platform.python_version()}


class JsonlLog:
    def __init__(self, path, keep_until=None):
        self.path = path
        if keep_until is not None and os.path.exists(path):   # drop records past the checkpoint
            with open(path) as f:
                rows = [r for r in f if r.strip() and json.loads(r).get("step", 0) <= keep_until]
            with open(path, "w") as f:
                f.writelines(rows)
        elif keep_until is None and os.path.exists(path):
            os.remove(path)

    def write(self, **rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def evaluate(steps, params, vbatches, cfg):
    losses = [float(steps.eval_step(params, steps.put_batch(vbatches.get(i, salt=1))))
              for i in range(cfg.eval_batches)]
    loss = float(np.mean(losses))
    return loss, loss / math.log(2)


def train(cfg):
    """Trains (or resumes) the run in cfg.out; returns the summary dict."""
    return _train(cfg, parallel.make_mesh(cfg.tensor_parallel))


def _train(cfg, mesh):
    t_start = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    check_resumable(cfg, cfg.out)
    cfg.save(os.path.join(cfg.out, "config.json"))
    parallel.set_mesh(mesh)
    if cfg.batch_size % mesh.shape["data"] or cfg.heads % cfg.tensor_parallel \
            or cfg.kv_heads % cfg.tensor_parallel:
        raise SystemExit(f"batch {cfg.batch_size} / heads {cfg.heads}/{cfg.kv_heads} must divide "
                         f"the mesh {dict(mesh.shape)}")

    train_bytes, valid_bytes, corpus = load_corpus(cfg.data)
    batches, vbatches = Batches(train_bytes, cfg), Batches(valid_bytes, cfg)
    steps = Steps(cfg, mesh)
    ckpt = Checkpointer(cfg.out, keep=cfg.keep, directory=cfg.ckpt_dir)
    start = ckpt.latest_step()
    if start is None:
        state, start = steps.init_state(jax.random.PRNGKey(cfg.seed)), 0
    else:
        state = ckpt.restore(abstract_like(steps.state_shape, steps.state_sharding), start)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    backend = attention_backend(cfg)
    meta = dict(n_params=steps.n_params, corpus=corpus, train_bytes=len(train_bytes),
                valid_bytes=len(valid_bytes), tokens_per_step=tokens_per_step,
                attention_backend=backend, devices=[d.device_kind for d in jax.devices()],
                mesh=dict(mesh.shape), resumed_from=start, versions=_versions())
    log = JsonlLog(os.path.join(cfg.out, "metrics.jsonl"), keep_until=start if start else None)
    samples_log = JsonlLog(os.path.join(cfg.out, "samples.jsonl"), keep_until=start if start else None)
    n_sample = mesh.shape["data"]
    sampler = make_sampler(cfg, min(cfg.seq_len, cfg.prompt_len + cfg.sample_len))
    sched = schedule(cfg)

    # compile ahead of time so step times exclude compilation
    t0 = time.time()
    batch = steps.put_batch(batches.get(start))
    train_step = steps.train_step.lower(state, batch).compile()
    meta["compile_s"] = time.time() - t0
    with open(os.path.join(cfg.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"[{cfg.out}] {cfg.model} {cfg.attention} ({backend}), {steps.n_params / 1e6:.2f}M params, "
          f"mesh {dict(mesh.shape)}, corpus {corpus}: {len(train_bytes)/1e6:.1f}M train / "
          f"{len(valid_bytes)/1e6:.2f}M valid bytes, compile {meta['compile_s']:.1f}s", flush=True)

    def do_sample(step):
        src = vbatches.get(10**6 + step, salt=2, batch=n_sample)
        prompt = src["tokens"][:, :cfg.prompt_len]
        out = sampler(state["params"], prompt, jax.random.PRNGKey(step),
                      src.get("src"), src.get("src_len"))
        row = np.asarray(out)[0]
        prompt_text, completion = to_text(row[:cfg.prompt_len]), to_text(row[cfg.prompt_len:])
        samples_log.write(step=step, prompt=prompt_text, completion=completion)
        tqdm.write(f"--- sample @ {step} (prompt, then ⟫ model) ---\n{prompt_text}⟫{completion}\n---")

    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 20.0)   # sparse lines in log files
    step, t_int, n_int, pending = start, time.time(), 0, []
    t_loop, timed_out = time.time(), False
    while step < end:
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        step += 1
        n_int += 1
        if step < end:
            batch = steps.put_batch(batches.get(step))   # host work overlaps the device step
        bar.update(1)
        if cfg.time_limit and not timed_out and time.time() - t_loop > cfg.time_limit:
            timed_out, end = True, step   # out of time: finish this step as the last one
            tqdm.write(f"time limit of {cfg.time_limit:.0f}s reached at step {step}; stopping")
        last = step == end
        final = last and (step == cfg.steps or timed_out)
        if step % cfg.log_every == 0 or last:
            ms = jax.device_get(pending)   # blocks: closes the timing interval
            dt = (time.time() - t_int) / n_int
            for i, m in enumerate(ms):
                s = step - len(ms) + i + 1
                log.write(kind="train", step=s, loss=float(m["loss"]),
                          grad_norm=float(m["grad_norm"]), lr=float(sched(s - 1)),
                          step_time=dt, tokens_per_s=tokens_per_step / dt)
            bar.set_postfix(loss=f"{float(ms[-1]['loss']):.3f}", tok_s=f"{tokens_per_step / dt:,.0f}",
                            refresh=sys.stderr.isatty())
            pending, n_int = [], 0
            t_int = time.time()
        paused = False
        if (cfg.eval_every and step % cfg.eval_every == 0) or final:
            vl, vb = evaluate(steps, state["params"], vbatches, cfg)
            log.write(kind="eval", step=step, val_loss=vl, val_bpb=vb)
            tqdm.write(f"step {step}: val loss {vl:.4f}, val bpb {vb:.4f}")
            paused = True
        if cfg.sample_every and (step % cfg.sample_every == 0 or final):
            try:
                do_sample(step)
            except Exception as e:   # a failing decode path must not cost the training run
                samples_log.write(step=step, error=f"{type(e).__name__}: {e}"[:2000])
                tqdm.write(f"!! sampling failed at step {step}: {type(e).__name__}: {e}"[:2000])
            paused = True
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last:
            ckpt.save(step, state)
            paused = True
        if paused:
            jax.block_until_ready(state)
            t_int = time.time()
    bar.close()
    ckpt.close()
    summary = summarize(cfg.out)
    summary.update(wall_s=time.time() - t_start, compile_s=meta["compile_s"], timed_out=timed_out)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(r) for r in f if r.strip()]


def summarize(run_dir):
    """Step time (median over logging intervals, the first excluded), throughput, last val."""
    recs = read_metrics(run_dir)
    with open(os.path.join(run_dir, "meta.json")) as f:
        meta = json.load(f)
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    intervals = []   # records of one logging interval share its step_time
    for r in train:
        if not intervals or intervals[-1] != r["step_time"]:
            intervals.append(r["step_time"])
    times = intervals[1:] or intervals
    st = float(np.median(times)) if times else float("nan")
    return {"steps": train[-1]["step"] if train else 0, "step_time_s": st,
            "tokens_per_s": meta["tokens_per_step"] / st,
            "final_train_loss": float(np.mean([r["loss"] for r in train[-10:]])) if train else None,
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "final_val_bpb": evals[-1]["val_bpb"] if evals else None,
            "n_params": meta["n_params"], "attention_backend": meta["attention_backend"]}
