"""The device mesh ("data" x "model") and sharding helpers.

Batch dims are sharded over "data", attention heads and MLP hidden units over "model" (Megatron
style, as dalle-mini's partitions.py). Activations are constrained with explicit NamedShardings,
so no global mesh context manager is needed (its API moved between JAX versions).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_MESH = None


def make_mesh(tensor_parallel=1):
    devices = jax.devices()
    if len(devices) % tensor_parallel:
        raise ValueError(f"--tensor-parallel {tensor_parallel} does not divide {len(devices)} devices")
    grid = np.array(devices).reshape(len(devices) // tensor_parallel, tensor_parallel)
    return Mesh(grid, ("data", "model"))   # default axis types: Auto (GSPMD/Shardy propagation)


def set_mesh(mesh):
    global _MESH
    _MESH = mesh


def constrain(x, *spec):
    """with_sharding_constraint(x, P(*spec)) on the current mesh; a no-op without one."""
    if _MESH is None or _MESH.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(_MESH, P(*spec)))


# Parameter partitioning by name (as dalle-mini's partitions.py): heads / MLP units on "model".
_RULES = {
    ("query", "kernel"): (None, "model", None), ("key", "kernel"): (None, "model", None),
    ("value", "kernel"): (None, "model", None), ("out", "kernel"): ("model", None, None),
    ("fc1", "kernel"): (None, "model"), ("fc1", "bias"): ("model",),
    ("fc2", "kernel"): ("model", None), ("log_scale",): ("model",), ("head_scale",): ("model",),
}


def param_specs(params):
    """PartitionSpec per parameter; a leading nn.scan layer axis stays unsharded."""
    def spec(path, x):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        for key, rule in _RULES.items():
            if names[-len(key):] == key:
                return P(*((None,) * (len(x.shape) - len(rule)) + rule))
        return P()
    return jax.tree_util.tree_map_with_path(spec, params)
