"""The per-head learned scale: log-parameterised and clamped, as in SwinV2 / VAR."""

import math

import jax.numpy as jnp

DEFAULT_SCALE = 10.0   # fixed scale, and the learned scale's initial value (log-parameterised)
DEFAULT_SCALE_MAX = 100.0  # SwinV2/VAR clamp of the learned scale


def learned_scale(logit_scale, scale_max=DEFAULT_SCALE_MAX):
    """exp(min(logit_scale, log(scale_max))): the SwinV2 parameterisation (no gradient above the clamp)."""
    return jnp.exp(jnp.minimum(logit_scale, math.log(scale_max)))


def logit_scale_init(scale):
    """Initializer for a per-head log-scale parameter: every entry log(scale)."""
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, math.log(scale), dtype)
    return init
