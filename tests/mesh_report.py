"""Helpers for tests that compile on a 4-device host mesh in a subprocess and read the HLO."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
                        r"(-start)?\(")


def collectives(hlo_text):
    """[(kind, op_name)] of the collectives in compiled HLO text."""
    found = []
    for line in hlo_text.splitlines():
        m = COLLECTIVE.search(line)
        if m:
            name = re.search(r'op_name="([^"]*)"', line)
            found.append((m.group(1), name.group(1) if name else ""))
    return found


def spec4(sharding):
    spec = tuple(getattr(sharding, "spec", ()))
    return list(spec + (None,) * (4 - len(spec))) if spec else None


def run_mesh_check(module_name):
    """Runs `module_name._mesh_check()` with 4 host CPU devices; returns its last JSON line."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    code = f"import {module_name} as t; t._mesh_check()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
