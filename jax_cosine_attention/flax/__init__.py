"""Flax integration (needs `flax`): a one-argument `attention_fn` switch and attention modules.

    from jax_cosine_attention.flax import cosine_sim_attention_fn   # linen MHA / nnx MHA drop-in
    from jax_cosine_attention.flax.linen import CosineSimAttention  # linen module
    from jax_cosine_attention.flax.nnx import CosineSimAttention    # nnx module
"""

from ._scale import DEFAULT_SCALE, DEFAULT_SCALE_MAX, learned_scale
from ._sharding import LogicalAxes
from ._dense import cosine_attention_weights, dense_cosine_attention
from .attention_fn import cosine_sim_attention_fn

__all__ = ["cosine_sim_attention_fn", "LogicalAxes", "learned_scale", "cosine_attention_weights",
           "dense_cosine_attention", "DEFAULT_SCALE", "DEFAULT_SCALE_MAX"]
