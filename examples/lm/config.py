"""Run configuration: one dataclass, filled from the command line, saved as config.json."""

import argparse
import dataclasses
import json
import os

ATTENTIONS = ("cosine", "cosine-xla", "softmax")
NORMS = ("preln", "postln", "normformer", "swinv2")
MODELS = ("decoder", "encdec")

# Fields that change the model or the data stream: a resumed run must agree on all of them.
ARCH_FIELDS = ("model", "attention", "norm", "scale", "learned_scale", "l2norm_groups", "layers",
               "d_model", "heads", "kv_heads", "head_dim", "mlp_ratio", "seq_len", "enc_len",
               "batch_size", "dtype", "data", "seed")


@dataclasses.dataclass
class Config:
    out: str = "runs/default"
    # model
    model: str = "decoder"
    attention: str = "cosine"
    norm: str = "preln"
    scale: float = 10.0
    learned_scale: bool = False
    l2norm_groups: int = 1
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    kv_heads: int = 0          # 0 = heads (MHA); fewer = GQA
    head_dim: int = 0          # 0 = d_model // heads
    mlp_ratio: int = 4
    seq_len: int = 256         # decoder (target) length
    enc_len: int = 0           # encoder (source) length for --model encdec; 0 = seq_len // 4
    dtype: str = "bfloat16"    # compute dtype; params are always float32
    remat: bool = False
    scan: bool = False
    # optimisation
    batch_size: int = 16       # global batch
    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    # parallelism
    tensor_parallel: int = 1   # size of the "model" (head) mesh axis; data axis = devices / this
    # data
    data: str = ""             # "" = the Python standard library corpus
    seed: int = 0
    # reporting
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    sample_every: int = 500
    sample_len: int = 200
    prompt_len: int = 64
    temperature: float = 0.8
    ckpt_every: int = 500      # 0 = only at the end
    ckpt_dir: str = ""         # "" = RUN_DIR/checkpoints
    keep: int = 2
    stop_at: int = 0           # stop (and checkpoint) at this step; the schedule still uses steps
    time_limit: float = 0.0    # seconds of training (compile excluded); then eval, save, stop
    progress: bool = True

    def __post_init__(self):
        if self.kv_heads == 0:
            self.kv_heads = self.heads
        if self.head_dim == 0:
            self.head_dim = self.d_model // self.heads
        if self.enc_len == 0:
            self.enc_len = max(1, self.seq_len // 4)
        if self.model not in MODELS or self.attention not in ATTENTIONS or self.norm not in NORMS:
            raise ValueError(f"bad model/attention/norm: {self.model}/{self.attention}/{self.norm}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.head_dim % self.l2norm_groups:
            raise ValueError(f"l2norm_groups={self.l2norm_groups} must divide head_dim={self.head_dim}")
        if self.learned_scale and self.attention == "softmax":
            raise ValueError("--learned-scale applies to cosine attention only")

    @property
    def cosine(self):
        return self.attention != "softmax"

    def save(self, path):
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls(**json.load(f))


def build_parser():
    p = argparse.ArgumentParser(
        description="Train a byte-level transformer with cosine-sim or softmax attention, "
                    "or compare finished runs (--compare).")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                   help="plot loss/bpb curves of these runs into one PNG and print a table")
    p.add_argument("--compare-out", default="compare.png", help="PNG path for --compare")
    p.add_argument("--labels", nargs="+", help="legend labels for --compare (default: dir names)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            kw = {}
            if f.name == "attention":
                kw["choices"] = ATTENTIONS
            elif f.name == "norm":
                kw["choices"] = NORMS
            elif f.name == "model":
                kw["choices"] = MODELS
            elif f.name == "dtype":
                kw["choices"] = ("bfloat16", "float32")
            p.add_argument(flag, type=typ, default=f.default, **kw)
    return p


def config_from_args(ns):
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(ns).items() if k in names})


def check_resumable(cfg, run_dir):
    """Raises if run_dir holds a config whose architecture/data fields differ from cfg's."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    old = Config.load(path)
    diff = {k: (getattr(old, k), getattr(cfg, k)) for k in ARCH_FIELDS
            if getattr(old, k) != getattr(cfg, k)}
    if diff:
        raise SystemExit(f"{run_dir} holds a run with a different configuration {diff}; "
                         "use another --out or the same flags")
