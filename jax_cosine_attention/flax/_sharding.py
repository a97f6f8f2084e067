"""Logical sharding annotations for the modules' activations (params are annotated in place)."""

from typing import NamedTuple

import jax
import flax.linen as nn


class LogicalAxes(NamedTuple):
    """Logical axis names used for parameter and activation sharding annotations.

    Map them to mesh axes with `flax.linen.logical_axis_rules` (shared by linen and nnx), e.g.
    `[("batch", "data"), ("heads", "model"), ("kv_heads", "model")]`. Without rules the
    annotations do nothing.
    """
    batch: str | None = "batch"
    length: str | None = "length"
    embed: str | None = "embed"
    heads: str | None = "heads"
    kv_heads: str | None = "kv_heads"
    head_dim: str | None = "kv"


def _explicit_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not mesh.are_all_axes_explicit else mesh


def _mesh_spec(names):
    """PartitionSpec for logical names under the active rules, or None without rules."""
    if not nn.get_logical_axis_rules():
        return None
    return nn.logical_to_mesh_axes(names)


def constrain(x, names):
    """Logical sharding constraint for [B, L, heads, dim] activations; a no-op without rules/mesh.

    Auto meshes: `nn.with_logical_constraint`. Explicit meshes: `jax.sharding.reshard`. Names are
    dropped for dims of size 1 (e.g. MQA's single kv head), and nothing is done unless there is
    exactly one leading batch dim.
    """
    if x.ndim != len(names):
        return x
    names = tuple(None if d == 1 else n for d, n in zip(x.shape, names))
    if _explicit_mesh() is None:
        return nn.with_logical_constraint(x, names)
    spec = _mesh_spec(names)
    return x if spec is None else jax.sharding.reshard(x, spec)


def out_sharding(names):
    """`out_sharding` for the output projection on an Explicit mesh (its contraction runs over the
    sharded heads, which Explicit mode will not resolve on its own); None otherwise."""
    return None if _explicit_mesh() is None else _mesh_spec(names)


def out_names(ax, x):
    """Logical names of the output projection's result [batch..., L, features]."""
    return (ax.batch, ax.length, ax.embed) if x.ndim == 4 else (None,) * (x.ndim - 1)
