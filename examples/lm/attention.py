"""Multi-head attention layer: cosine-sim (this library) or softmax (jax.nn), with a decode cache.

q/k/v are [B, T, heads, head_dim] — the jax.nn.dot_product_attention layout both ops share.
Cosine: logits = scale * <l2norm(q), l2norm(k)>, scale fixed (--scale) or learned per head
(log-parametrised, clamped at 100 as in SwinV2). Softmax: logits = q.k / sqrt(head_dim), through
cuDNN on a GPU (bf16/fp16) and XLA elsewhere. Key padding: cosine gets a bool mask [B,1,1,S]
(broadcast, never expanded); softmax gets key_value_seq_lengths, cuDNN's native padding mask.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_cosine_attention import cosine_sim_attention

from .parallel import constrain

MAX_LEARNED_SCALE = 100.0


# Fan-in normal init for every dense kernel; sharding comes from names (parallel.param_specs).
KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def softmax_implementation(dtype, decode):
    """'cudnn' for bf16/fp16 training on a GPU, else XLA (None)."""
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and not decode and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else None


def attend(cfg, q, k, v, *, causal, kv_len=None, scale=None, decode=False):
    """The attention op alone: q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]."""
    if cfg.cosine:
        mask = None
        if kv_len is not None:   # key padding as a broadcast bool mask [B,1,1,S]
            mask = (jnp.arange(k.shape[1])[None, :] < kv_len[:, None])[:, None, None, :]
        return cosine_sim_attention(
            q, k, v, mask=mask, scale=cfg.scale if scale is None else scale,
            groups=cfg.l2norm_groups, is_causal=causal,
            implementation="xla" if cfg.attention == "cosine-xla" else None)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, key_value_seq_lengths=kv_len,
        implementation=softmax_implementation(q.dtype, decode))


class Attention(nn.Module):
    """Self- (kv=None) or cross-attention. With decode=True (self-attention), x is one token
    [B,1,D] and keys/values are appended to a fixed-size cache of cfg.seq_len positions."""
    cfg: object
    causal: bool = False
    decode: bool = False
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, kv=None, kv_len=None):
        cfg = self.cfg
        N, K, H = cfg.heads, cfg.kv_heads, cfg.head_dim
        dense = lambda n, name: nn.DenseGeneral(
            (n, H), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=KERNEL_INIT, name=name)
        src = x if kv is None else kv
        q = constrain(dense(N, "query")(x), "data", None, "model", None)
        k = constrain(dense(K, "key")(src), "data", None, "model", None)
        v = constrain(dense(K, "value")(src), "data", None, "model", None)

        scale = None
        if cfg.cosine and cfg.learned_scale:
            log_scale = self.param("log_scale", lambda _, shape: jnp.full(
                shape, math.log(cfg.scale), jnp.float32), (N,))
            scale = jnp.exp(jnp.minimum(log_scale, math.log(MAX_LEARNED_SCALE)))

        causal = self.causal
        if self.decode and kv is None:
            B = x.shape[0]
            if x.shape[1] != 1:
                raise ValueError(f"decode=True takes one token per call, got x{x.shape}")
            ck = self.variable("cache", "cached_key", jnp.zeros, (B, cfg.seq_len, K, H), k.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, (B, cfg.seq_len, K, H), v.dtype)
            idx = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            i = idx.value
            ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
            cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
            idx.value = i + x.shape[1]
            k, v = ck.value, cv.value
            # one query at position i sees cache slots [0, i]: a length mask replaces causality
            kv_len, causal = jnp.full((B,), i + 1, jnp.int32), False

        out = attend(cfg, q, k, v, causal=causal, kv_len=kv_len, scale=scale, decode=self.decode)
        if cfg.norm == "normformer":   # NormFormer per-head output scale
            head_scale = self.param("head_scale", nn.initializers.ones, (N,))
            out = out * head_scale.astype(out.dtype)[:, None]
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype,
                               param_dtype=jnp.float32, name="out",
                               kernel_init=KERNEL_INIT)(out)
