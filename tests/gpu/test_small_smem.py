"""The portable kernels within 99 KB of shared memory a block, the limit of sm_86/89/120 devices
(RTX 30xx-50xx, A10, L4, L40): where a default tile needs more (D=128: the dq kernel and the plain
forward, 102 KB each), the launchers take a smaller one. Within an A100's 163 KB, the D=128
one-kernel backward takes its single-buffered-dO tile (158 KB instead of 175).

JCA_DEBUG_SMEM_LIMIT caps what the launchers may use (a launch above the cap fails), so this GPU
runs the small device's tiles. The cap is read once per process: each case runs pytest or Python
in a child process, with the sm_90a kernels off as on such a device.
"""
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SMALL_DEVICE = 99 * 1024
A100 = 163 * 1024


def _child(cap, argv):
    env = {**os.environ, "JCA_DEBUG_SMEM_LIMIT": str(cap), "JCA_SM90": "0"}
    return subprocess.run([sys.executable, "-P", *argv], env=env, capture_output=True, text=True,
                          timeout=900)


def test_kernel_suite_within_99kb():
    cases = ("test_fwd_bwd_dims or test_bias_mask_d128 or test_masks_lengths_empty_rows "
             "or test_online_paths or test_public_op_cuda_vs_xla")
    r = _child(SMALL_DEVICE, ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                              "--rootdir", str(HERE), str(HERE / "test_cuda_kernels.py"),
                              "-k", cases])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-800:]


def test_d128_backward_within_a100_limit():
    cases = "(test_fwd_bwd_dims and 128) or test_masks_lengths_empty_rows"
    r = _child(A100, ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                      "--rootdir", str(HERE), str(HERE / "test_cuda_kernels.py"), "-k", cases])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-800:]


def test_cap_is_honoured():
    """Below what any tile needs, the call fails with a clear error (so the suite above ran
    under the cap, not beside it)."""
    code = """
import jax, jax.numpy as jnp
from jax_cosine_attention import _cuda
q = jnp.ones((1, 64, 2, 128), jnp.bfloat16)
try:
    jax.block_until_ready(_cuda.fwd(q, q, q, jnp.ones((2,), jnp.float32), None, None, None, None,
                                    causal=False, groups=1, bounded=True))
except Exception as e:
    print("ERR", e)
"""
    r = _child(32 * 1024, ["-c", code])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERR" in r.stdout and "bytes of shared memory" in r.stdout, r.stdout[-2000:]
