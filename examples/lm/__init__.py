"""Byte-level language-model experiment harness for cosine-sim vs softmax attention.

Modules: config (CLI + dataclass), data (corpora and batches), attention (the attention layer and
its decode cache), model (decoder-only and encoder-decoder transformers), parallel (device mesh
and shardings), optim (AdamW schedule), checkpoint (orbax), sample (cached decoding),
train_loop (the training driver) and compare (plots and tables over runs).
"""
