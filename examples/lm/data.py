"""Byte corpora and deterministic batch sampling.

Default corpus (no --data): the source of the installed Python standard library — every ``*.py``
file under ``sysconfig.get_paths()["stdlib"]`` (site-/dist-packages excluded), walked in sorted
order, each prefixed by a ``# file: <relative path>`` line. Files whose CRC32(path) % 20 == 0
(about 5%) form the validation split, so validation text comes from unseen files. It is real
text on every machine with no download; its exact bytes depend on the Python version (about
32 MB for CPython 3.12).

--data PATH: raw bytes (gzip-decompressed when PATH ends in .gz). Corpora of at least 95 MB
(enwik8) are split as the seed library does — first 90M bytes train, next 5M valid; smaller
files keep their last 5% for validation.

Batches: step s draws its random crops from numpy's PCG64 seeded by (seed, s), so a resumed run
sees exactly the batches the uninterrupted run would have seen.
"""

import gzip
import os
import sysconfig
import zlib

import numpy as np

SEED_TRAIN, SEED_VALID = 90_000_000, 5_000_000
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_corpus():
    """(train_bytes, valid_bytes) built from the standard library's .py files."""
    root = sysconfig.get_paths()["stdlib"]
    train, valid = [], []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            with open(path, "rb") as f:
                text = b"# file: " + rel.encode() + b"\n" + f.read() + b"\n"
            (valid if zlib.crc32(rel.encode()) % 20 == 0 else train).append(text)
    return b"".join(train), b"".join(valid)


def file_corpus(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read(SEED_TRAIN + SEED_VALID)
    if len(raw) >= SEED_TRAIN + SEED_VALID:
        return raw[:SEED_TRAIN], raw[SEED_TRAIN:]
    cut = int(len(raw) * 0.95)
    return raw[:cut], raw[cut:]


def load_corpus(path=""):
    """(train, valid) as uint8 numpy arrays, and a short description of the source."""
    if path:
        train, valid = file_corpus(path)
        desc = os.path.basename(path)
    else:
        train, valid = stdlib_corpus()
        desc = f"python-stdlib ({sysconfig.get_paths()['stdlib']})"
    return (np.frombuffer(train, np.uint8), np.frombuffer(valid, np.uint8), desc)


def _crops(data, rng, batch, length):
    starts = rng.integers(0, len(data) - length, size=batch)
    return np.stack([data[s:s + length] for s in starts]).astype(np.int32)


class Batches:
    """Deterministic batches for the decoder-only or encoder-decoder task.

    decoder: {"tokens": [B, L+1]} — inputs are tokens[:, :-1], targets tokens[:, 1:].
    encdec:  a crop of E + L + 1 bytes; the encoder sees the first `src_len[b]` of the E source
             bytes (uniform in [E/2, E], the rest padded with 0 and masked), the decoder
             continues the text: "tokens" [B, L+1] starts with the last source byte.
    """

    def __init__(self, data, cfg):
        self.data, self.cfg = data, cfg
        if len(data) <= cfg.seq_len + cfg.enc_len + 2:
            raise ValueError(f"corpus of {len(data)} bytes is too short for seq_len={cfg.seq_len}")

    def get(self, step, salt=0, batch=None):
        cfg = self.cfg
        batch = batch or cfg.batch_size
        rng = np.random.default_rng([cfg.seed, salt, step])
        if cfg.model == "decoder":
            return {"tokens": _crops(self.data, rng, batch, cfg.seq_len + 1)}
        E = cfg.enc_len
        crop = _crops(self.data, rng, batch, E + cfg.seq_len + 1)
        src_len = rng.integers(max(1, E // 2), E + 1, size=batch).astype(np.int32)
        src = np.zeros((batch, E), np.int32)
        tokens = np.zeros((batch, cfg.seq_len + 1), np.int32)
        for b, n in enumerate(src_len):
            src[b, :n] = crop[b, E - n:E]   # the n bytes right before the target
            tokens[b] = crop[b, E - 1:E + cfg.seq_len]
        return {"tokens": tokens, "src": src, "src_len": src_len}
