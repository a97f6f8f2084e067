"""AdamW with linear warmup, cosine decay and global-norm gradient clipping (optax)."""

import jax
import optax


def schedule(cfg):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=max(1, cfg.warmup),
        decay_steps=max(cfg.steps, cfg.warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices (dense kernels, embeddings) only — not on norms, biases,
    positional tables or learned attention scales."""
    def keep(path, _):
        name = getattr(path[-1], "key", str(path[-1]))
        return name in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg):
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=_decay_mask))
