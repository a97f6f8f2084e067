"""jax-cosine-attention: fast, memory-efficient cosine-similarity attention for JAX."""

from .api import cosine_sim_attention, sharded_cosine_sim_attention
from .normalize import l2norm
from .reference import cosine_sim_attention_reference
from ._ring import ring_cosine_sim_attention, to_zigzag, from_zigzag, zigzag_positions

__version__ = "0.1.0"
__all__ = ["cosine_sim_attention", "sharded_cosine_sim_attention", "l2norm",
           "cosine_sim_attention_reference", "ring_cosine_sim_attention", "to_zigzag",
           "from_zigzag", "zigzag_positions", "__version__"]
