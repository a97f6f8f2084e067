"""Autoregressive byte sampling with the per-layer KV cache (one jitted lax.scan).

The prompt is fed one byte per step through the same cached decode step as the generated
bytes; at each step the layer appends its key/value to a fixed [B, seq_len, K, H] cache and
attends with a key-length mask. For the encoder-decoder the source is encoded once.
"""

import jax
import jax.numpy as jnp

from .model import Transformer


def init_cache(cfg, batch):
    """Zeroed decode cache for `batch` sequences (shapes via eval_shape, nothing computed)."""
    model = Transformer(cfg, decode=True)
    tok = jnp.zeros((batch, 1), jnp.int32)
    enc = jnp.zeros((batch, cfg.enc_len, cfg.d_model), jnp.dtype(cfg.dtype))
    src_len = jnp.full((batch,), cfg.enc_len, jnp.int32)
    shapes = jax.eval_shape(lambda r: model.init(r, tok, src_len=src_len, enc=enc)["cache"],
                            jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def make_sampler(cfg, length):
    """Returns jitted f(params, prompt [B,P], rng, src=None, src_len=None) -> bytes [B, length]."""
    full, step_model = Transformer(cfg), Transformer(cfg, decode=True)
    if length > cfg.seq_len:
        raise ValueError(f"sample length {length} exceeds the cache size seq_len={cfg.seq_len}")

    def sample(params, prompt, rng, src=None, src_len=None):
        B, P = prompt.shape
        enc = None
        if cfg.model == "encdec":
            enc = full.apply({"params": params}, src, src_len, method=Transformer.encode)

        def step(carry, t):
            cache, tok, rng = carry
            logits, upd = step_model.apply({"params": params, "cache": cache}, tok[:, None],
                                            src_len=src_len, enc=enc, mutable=["cache"])
            rng, key = jax.random.split(rng)
            nxt = jax.random.categorical(key, logits[:, -1] / max(cfg.temperature, 1e-4))
            nxt = jnp.where(t + 1 < P, prompt[:, jnp.minimum(t + 1, P - 1)], nxt).astype(jnp.int32)
            return (upd["cache"], nxt, rng), nxt

        carry = (init_cache(cfg, B), prompt[:, 0], rng)
        _, out = jax.lax.scan(step, carry, jnp.arange(length - 1))
        return jnp.concatenate([prompt[:, :1], out.T], axis=1)

    return jax.jit(sample)


def to_text(byte_row):
    return bytes(int(b) for b in byte_row).decode("utf-8", errors="replace")
