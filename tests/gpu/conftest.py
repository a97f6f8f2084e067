"""GPU tests: skipped without an NVIDIA GPU; FAIL LOUDLY when a GPU is there but the CUDA extension
is missing (e.g. the source tree shadowed the installed package: run pytest from outside the repo).

Every kernel output is poisoned before each call (JCA_DEBUG_POISON=1 makes the FFI handlers fill
their outputs with NaN first), so an element the kernels never write shows up as NaN.
"""
import os

os.environ.setdefault("JCA_DEBUG_POISON", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu():
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    mine = [it for it in items if str(it.fspath).startswith(here)]
    if not HAS_GPU:
        skip = pytest.mark.skip(reason="no CUDA GPU visible to jax")
        for it in mine:
            it.add_marker(skip)
    for it in mine:
        it.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session", autouse=True)
def _extension_loaded():
    if not HAS_GPU:
        return
    from jax_cosine_attention import _cuda
    if getattr(_cuda, "DISABLED", False):
        pytest.skip("CUDA kernels disabled by JCA_DISABLE_CUDA=1", allow_module_level=True)
    if not _cuda.AVAILABLE:
        pytest.fail(f"A GPU is present but the CUDA extension is not available: {_cuda.IMPORT_ERROR} "
                    f"(module file {_cuda.__file__}; run pytest from outside the repo root)",
                    pytrace=False)
