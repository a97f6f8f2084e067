"""CPU smoke test of the examples/ training harness on the default (Python stdlib) corpus.

A tiny cosine-xla decoder trains for a few steps (loss must fall), a second run stopped halfway
and resumed from its orbax checkpoint must reproduce it exactly, and --compare must write the
PNG and table for it against a softmax encoder-decoder run.
"""

import dataclasses
import json
import math
import os
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))

from lm.checkpoint import Checkpointer  # noqa: E402
from lm.compare import compare  # noqa: E402
from lm.config import Config  # noqa: E402
from lm.train_loop import read_metrics, train  # noqa: E402

STEPS = 24
TINY = dict(layers=2, d_model=64, heads=4, kv_heads=2, seq_len=64, batch_size=8, steps=STEPS,
            lr=3e-3, warmup=4, log_every=1, eval_every=STEPS // 2, eval_batches=2,
            sample_every=STEPS // 2, sample_len=32, prompt_len=8, ckpt_every=STEPS // 2,
            progress=False, dtype="bfloat16", attention="cosine-xla")


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def _params(run_dir):
    ck = Checkpointer(run_dir)
    state = ck.restore(None)
    ck.close()
    return state["params"]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module: the resumed run and the decode checks
    recompile functions the first run already compiled (new closures, same HLO)."""
    import jax
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    try:
        old = {k: getattr(jax.config, k) for k in keys}
        jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax_cache")))
        jax.config.update(keys[1], 0.0)
        jax.config.update(keys[2], 0)
    except (AttributeError, ValueError):   # no persistent cache in this jax: just slower
        yield
        return
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    try:   # let later modules start from an uninitialised cache again
        from jax.experimental.compilation_cache import compilation_cache
        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory, compile_cache):
    root = tmp_path_factory.mktemp("runs")
    full = Config(out=str(root / "cosine"), **TINY)
    summary = train(full)
    resumed = dataclasses.replace(full, out=str(root / "resumed"), stop_at=STEPS // 2)
    train(resumed)
    train(dataclasses.replace(resumed, stop_at=0))
    softmax = Config(out=str(root / "softmax_encdec"), **{
        **TINY, "attention": "softmax", "model": "encdec", "norm": "normformer", "scan": True,
        "remat": True, "layers": 1, "steps": 6, "eval_every": 6, "sample_every": 6, "ckpt_every": 0})
    train(softmax)
    return root, summary


def test_loss_decreases(runs):
    root, summary = runs
    losses = _losses(root / "cosine")
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = np.mean([losses[s] for s in (1, 2, 3)])
    last = np.mean([losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)])
    assert last < first - 1.0, (first, last)
    assert all(math.isfinite(v) for v in losses.values())
    evals = [r for r in read_metrics(root / "cosine") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [STEPS // 2, STEPS]
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2))
    assert evals[-1]["val_bpb"] < 8.0   # better than uniform over bytes
    samples = [json.loads(r) for r in open(root / "cosine" / "samples.jsonl")]
    assert [s["step"] for s in samples] == [STEPS // 2, STEPS] and samples[-1]["completion"]
    assert summary["tokens_per_s"] > 0 and summary["final_val_bpb"] == evals[-1]["val_bpb"]


def test_resume_is_exact(runs):
    root, _ = runs
    meta = json.load(open(root / "resumed" / "meta.json"))
    assert meta["resumed_from"] == STEPS // 2
    a, b = _losses(root / "cosine"), _losses(root / "resumed")
    assert a == b   # bitwise-equal losses at every step, before and after the restart
    pa, pb = _params(root / "cosine"), _params(root / "resumed")
    import jax
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_compare_writes_plot_and_table(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "cmp" / "compare.png"
    md = compare([str(root / "cosine"), str(root / "softmax_encdec")], str(out))
    assert out.exists() and out.stat().st_size > 10_000
    assert (tmp_path / "cmp" / "compare.md").read_text() == md
    rows = [r for r in md.splitlines() if r.startswith("| cosine") or r.startswith("| softmax")]
    assert len(rows) == 2 and "cosine-xla" in rows[0] and "softmax" in rows[1]


@pytest.mark.parametrize("model,attention", [("decoder", "cosine-xla"), ("encdec", "softmax")])
def test_decode_cache_matches_full_forward(model, attention):
    import jax
    import jax.numpy as jnp
    from lm.model import Transformer
    from lm.sample import init_cache

    cfg = Config(model=model, attention=attention, norm="normformer", layers=1, d_model=32,
                 heads=4, kv_heads=2, seq_len=12, enc_len=6, dtype="float32", scan=True)
    full, step = Transformer(cfg), Transformer(cfg, decode=True)
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(0, 256, (2, cfg.seq_len)), jnp.int32)
    src = jnp.asarray(rng.integers(0, 256, (2, cfg.enc_len)), jnp.int32)
    src_len = jnp.array([cfg.enc_len, 2], jnp.int32)
    params = jax.jit(full.init)(jax.random.PRNGKey(0), tok, src, src_len)["params"]
    want = jax.jit(full.apply)({"params": params}, tok, src, src_len)
    enc = (jax.jit(lambda p: full.apply({"params": p}, src, src_len, method=Transformer.encode))(
        params) if model == "encdec" else None)

    @jax.jit
    def one(cache, t):
        logits, upd = step.apply({"params": params, "cache": cache}, t, src_len=src_len, enc=enc,
                                 mutable=["cache"])
        return logits[:, 0], upd["cache"]

    cache, got = init_cache(cfg, 2), []
    for i in range(cfg.seq_len):
        logits, cache = one(cache, tok[:, i:i + 1])
        got.append(logits)
    np.testing.assert_allclose(np.stack(got, 1), np.asarray(want), atol=2e-5, rtol=2e-5)
