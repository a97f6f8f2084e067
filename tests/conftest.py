import numpy as np
import jax
import pytest

from jax_cosine_attention import _xla


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Small XLA blocks, so test shapes cross many (and ragged) block boundaries."""
    monkeypatch.setattr(_xla, "BLOCK_SIZES", (32, 16))


@pytest.fixture
def rng(request):
    """Fresh random inputs on every run (the seed is printed on failure)."""
    seed = np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def fast_compiles():
    """Tiny shapes: compile time dominates, so skip most XLA optimisations in the module."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
