"""Batch x head sharding: no collectives, same numbers (4 host CPU devices, in a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("sharding_check.py"))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


CONFIGS = [f"{mode}-{rest}" for mode in ("Auto", "Explicit")
           for rest in ("K2-bias1", "K4-bias0", "K1-bias0")]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("stage", ["fwd", "grad"])
def test_batch_head_sharding_has_no_collectives(results, config, stage):
    r = results[config][stage]
    if config.endswith("K1-bias0") and stage == "grad":
        # MQA: the one kv head is replicated over the head axis, so dk/dv are summed across it.
        assert set(r["collectives"]) <= {"all-reduce"}, r
    else:
        assert r["collectives"] == [], r
    assert r["max_err"] < 1e-4, r


def test_output_stays_sharded(results):
    assert "'data', None, 'model'" in results["Auto-K2-bias1"]["fwd"]["out_spec"]


def test_shard_map_helper(results):
    r = results["shard_map"]
    assert r["max_err"] < 1e-4, r
    # The gradient of the replicated per-head scale is the only cross-device reduction.
    assert set(r["collectives"]) <= {"all-reduce"}, r


def test_norm_op_sharding(results):
    """The op with the l2norm inside (the CUDA path's fused-l2norm-backward route): same numbers
    sharded; only the per-head scale's gradient is reduced across devices."""
    r = results["norm_op"]["heads"]
    assert r["max_err"] < 1e-4, r
    assert set(r["collectives"]) <= {"all-reduce"}, r
    # sequence sharded: ring attention (K/V blocks travel), the l2norm backward on local rows
    r = results["norm_op"]["ring"]
    assert r["max_err"] < 1e-4, r
    assert "collective-permute" in r["collectives"], r
