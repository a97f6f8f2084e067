"""Ring attention (sequence parallelism) on 4 host CPU devices, in a subprocess.

tests/ring_check.py runs every case once (compiles dominate the run time) and reports JSON;
the tests below assert on it: the sharded forward and gradients (q, k, v, scale) equal the
unsharded op, the compiled programs move K/V with collective-permutes and never all-gather them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOL = 2e-5  # float32, relative to the largest magnitude


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    env.pop("JCA_RING", None)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ring_check.py"))],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


RING_CASES = [
    "helper-contiguous-full",       # non-causal, GQA, key padding + query lengths
    "helper-zigzag-causal",         # load-balanced layout
    "helper-2axes-zigzag-mask",     # ring over two mesh axes, key mask + key bias, empty rows
    "helper-batch-seq-mqa",         # batch x sequence mesh, MQA
    "hook-causal",                  # plain cosine_sim_attention, NamedSharding on the sequence,
                                    # per-key bias (its gradient travels with dK/dV)
    "hook-explicit-causal",         # ... on an Explicit mesh (shard_map ring path)
    "hook-batch-seq-mask",          # ... batch x sequence, non-causal, key-padding mask
]


@pytest.mark.parametrize("case", RING_CASES)
def test_ring_matches_unsharded(results, case):
    r = results[case]
    assert r["finite"], r
    assert r["max_err_out"] < TOL, r
    assert r["max_err_grad"] < TOL, r


@pytest.mark.parametrize("case", RING_CASES)
def test_ring_uses_collective_permute_not_all_gather(results, case):
    r = results[case]
    assert "collective-permute" in r["collectives"], r
    assert "all-gather" not in r["collectives"], r["all_gathers"]
    # The only reduction is the per-head scale's gradient (and dk/dv over heads for MQA).
    assert set(r["collectives"]) <= {"collective-permute", "all-reduce"}, r


def test_hook_can_be_disabled(results):
    r = results["hook-disabled"]
    assert "all-gather" in r["collectives"], r
    assert "collective-permute" not in r["collectives"], r
    assert r["max_err_out"] < TOL, r


def test_full_bias_with_sharded_sequence_is_a_clear_error(results):
    msg = results["helper-bias-error"]["raised"]
    assert msg is not None and "both a full query dim and a full key dim" in msg, msg


def test_ring_blocks_lower_to_the_cuda_kernel(results):
    """Lowered for "cuda" (kernel availability monkeypatched): every block is a kernel call;
    the diagonal block is causal, the others are plain (masked blocks are skipped, never
    computed with a mask). Contiguous: step 0, loop body, last step. Zig-zag: step 0, then two
    half-size variants (cond branches) in the loop body and in the last step."""
    r = results["cuda-lowering"]
    assert r["contiguous"]["fwd"] == [True, False, False], r
    assert r["contiguous"]["bwd"] == [True, False, False], r
    assert r["zigzag"]["fwd"] == [True, False, False, False, False], r
    assert r["zigzag"]["bwd"] == [True, False, False, False, False], r
    assert r["contiguous"]["collective_permutes"] > 0


def test_zigzag_layout_helpers():
    import jax.numpy as jnp
    import numpy as np
    from jax_cosine_attention import from_zigzag, to_zigzag, zigzag_positions

    x = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
    z = to_zigzag(x, 4)
    np.testing.assert_array_equal(from_zigzag(z, 4), x)
    pos = np.asarray(zigzag_positions(16, 4))
    # device d holds chunks d and 2n-1-d (chunk size 2)
    np.testing.assert_array_equal(pos[:4], [0, 1, 14, 15])
    np.testing.assert_array_equal(pos[4:8], [2, 3, 12, 13])
    np.testing.assert_array_equal(z[:, :, 0], x[:, pos, 0])
