"""Byte-level transformers: decoder-only LM and a BART-like encoder-decoder.

Norm placements (dalle-mini's `ln_positions`), for a sublayer f (attention or MLP):
  preln:      x + f(LN(x))                      (+ final LN)
  postln:     LN(x + f(x))
  normformer: x + LN(f(LN(x))), an extra LN after the MLP activation, per-head attention
              output scale (+ final LN)
  swinv2:     x + LN(f(x))  (SwinV2 "res-post-norm"; + final LN)
Parameters are float32; compute runs in cfg.dtype (bf16 by default); logits are upcast to f32.
Layers can be rematerialised (--remat) and stacked with nn.scan (--scan).
"""

import flax.linen as nn
import jax.numpy as jnp

from .attention import KERNEL_INIT, Attention
from .parallel import constrain

VOCAB = 256


class MLP(nn.Module):
    cfg: object
    dtype: object

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = nn.Dense(cfg.mlp_ratio * cfg.d_model, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=KERNEL_INIT, name="fc1")(x)
        h = constrain(nn.gelu(h), "data", None, "model")
        if cfg.norm == "normformer":
            h = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_mid")(h)
        return nn.Dense(cfg.d_model, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=KERNEL_INIT, name="fc2")(h)


class Block(nn.Module):
    """Self-attention [+ cross-attention] + MLP. Returns (x, None) so it can be nn.scan'ed."""
    cfg: object
    causal: bool = False
    cross: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x, enc=None, enc_len=None):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        ln = lambda name: nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, name=name)

        def sublayer(x, f, name):
            if cfg.norm == "preln":
                return x + f(ln(name + "_ln")(x))
            if cfg.norm == "postln":
                return ln(name + "_ln")(x + f(x))
            if cfg.norm == "normformer":
                return x + ln(name + "_ln_post")(f(ln(name + "_ln")(x)))
            return x + ln(name + "_ln")(f(x))   # swinv2

        attn = Attention(cfg, causal=self.causal, decode=self.decode, dtype=dtype, name="self_attn")
        x = sublayer(x, attn, "self_attn")
        if self.cross:
            xattn = Attention(cfg, causal=False, decode=self.decode, dtype=dtype, name="cross_attn")
            x = sublayer(x, lambda h: xattn(h, kv=enc, kv_len=enc_len), "cross_attn")
        x = sublayer(x, MLP(cfg, dtype, name="mlp"), "mlp")
        return constrain(x, "data", None, None), None


class Stack(nn.Module):
    cfg: object
    causal: bool = False
    cross: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x, enc=None, enc_len=None):
        cfg = self.cfg
        block = Block
        if cfg.remat:
            block = nn.remat(block, prevent_cse=not cfg.scan)
        kw = dict(causal=self.causal, cross=self.cross, decode=self.decode)
        if cfg.scan:
            scanned = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                              split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                              length=cfg.layers)
            x, _ = scanned(cfg, name="layers", **kw)(x, enc, enc_len)
        else:
            for i in range(cfg.layers):
                x, _ = block(cfg, name=f"layer_{i}", **kw)(x, enc, enc_len)
        if cfg.norm != "postln":
            x = nn.LayerNorm(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, name="ln_f")(x)
        return x


class Transformer(nn.Module):
    """cfg.model == "decoder": logits = model(tokens). "encdec": logits = model(tokens, src,
    src_len); the encoder is bidirectional over the padded source, the decoder is causal with
    cross-attention to it. decode=True runs one target token per call against the cache."""
    cfg: object
    decode: bool = False

    def setup(self):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        self.embed = nn.Embed(VOCAB, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                              embedding_init=nn.initializers.normal(cfg.d_model ** -0.5), name="embed")
        self.pos = self.param("pos", nn.initializers.normal(0.02), (cfg.seq_len, cfg.d_model))
        if self.decode:
            self.pos_index = self.variable("cache", "pos", lambda: jnp.zeros((), jnp.int32))
        self.decoder = Stack(cfg, causal=True, cross=cfg.model == "encdec", decode=self.decode)
        if cfg.model == "encdec":
            self.enc_pos = self.param("enc_pos", nn.initializers.normal(0.02),
                                      (cfg.enc_len, cfg.d_model))
            self.encoder = Stack(cfg, causal=False)

    def encode(self, src, src_len):
        x = self.embed(src) + self.enc_pos[: src.shape[1]].astype(self.embed.dtype)
        return self.encoder(constrain(x, "data", None, None), None, src_len)

    def __call__(self, tokens, src=None, src_len=None, enc=None):
        """tokens [B,T] -> f32 logits [B,T,256]. enc: precomputed encode(src, src_len)."""
        if self.cfg.model == "encdec" and enc is None:
            enc = self.encode(src, src_len)
        T = tokens.shape[1]
        if self.decode:
            i = self.pos_index.value
            pos = jnp.take(self.pos, i + jnp.arange(T), axis=0)
            self.pos_index.value = i + T
        else:
            pos = self.pos[:T]
        x = self.embed(tokens) + pos.astype(self.embed.dtype)
        x = self.decoder(constrain(x, "data", None, None), enc, src_len)
        return self.embed.attend(x).astype(jnp.float32)
