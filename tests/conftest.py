import numpy as np
import jax
import pytest

from jax_cosine_attention import _cuda, _xla


def _has_gpu():
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


HAS_GPU = _has_gpu()
# Every CPU oracle test runs again through the fused kernel where a GPU and the extension exist.
IMPLEMENTATIONS = ["xla"] + (["cuda"] if HAS_GPU and _cuda.AVAILABLE else [])


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
