"""Where weights live, derived from the axis table (rules.py) through LogicalMesh (the runner places
KV pages and host batches the same way, by their logical axes).

There is one route for weights: `place` puts arrays (numpy from a checkpoint reader, or arrays
already on devices) straight into their target shardings; load_model uses it and orbax restores
into the same shardings. A deployment with replicas loads once onto the device mesh (dp x tp:
weights replicated over dp, split over tp) and each replica's engine takes a zero-copy view of its
row (`replica_view`), so no replica ever re-reads or re-copies the checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxserve.config import ModelConfig
from jaxserve.models import ParamSpec, abstract_model, param_specs
from jaxserve.parallel.logical import LogicalMesh
from jaxserve.parallel.rules import describe_placement

if TYPE_CHECKING:
    from jaxserve.checkpoint import LoadedModel

log = logging.getLogger(__name__)


def param_axes(cfg: ModelConfig) -> dict:
    """The logical axes of every parameter, matching the params' pure dict."""
    return jax.tree.map(lambda spec: spec.logical_axes, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """NamedShardings matching the params' pure dict (what load_model(..., mesh=...) loads into)."""
    return LogicalMesh.build(cfg, mesh).shardings(param_axes(cfg))


def place(tree, shardings):
    """The one way arrays reach their devices: each leaf of `tree` into its sharding."""
    return jax.tree.map(jax.device_put, tree, shardings)


def logical_mesh(cfg: ModelConfig, mesh: Mesh | None) -> LogicalMesh | None:
    """The LogicalMesh an engine on `mesh` places and splits by; None without a mesh (one device)."""
    return None if mesh is None else LogicalMesh.build(cfg, mesh)


def _on(pure: dict, shardings: dict) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, pure, shardings)))


def _with_params(model: LoadedModel, pure: dict) -> LoadedModel:
    _, state = abstract_model(model.config, jnp.dtype(model.dtype))
    nnx.replace_by_pure_dict(state, pure)
    return dataclasses.replace(model, params=state)


def shard_params(model: LoadedModel, mesh: Mesh) -> LoadedModel:
    """The model with its parameters placed by the axis table on `mesh` (unchanged if they already are)."""
    shardings = param_shardings(model.config, mesh)
    pure = nnx.to_pure_dict(model.params)
    return model if _on(pure, shardings) else _with_params(model, place(pure, shardings))


def _row_view(array: jax.Array, sharding: NamedSharding) -> jax.Array:
    """The array as it lies on the devices of `sharding`'s mesh, without copying: each of those
    devices already holds exactly its shard (the device mesh replicates weights over dp)."""
    devices = set(sharding.mesh.devices.flat)
    shards = [s.data for s in array.addressable_shards if s.device in devices]
    return jax.make_array_from_single_device_arrays(array.shape, sharding, shards)


def replica_view(model: LoadedModel, device_mesh: Mesh, replica: Mesh) -> LoadedModel:
    """The model's parameters, placed on `device_mesh` by the table, as arrays of the replica mesh
    (one row of it). A model placed anywhere else is placed on the replica (the same route as a load)."""
    cfg = model.config
    pure = nnx.to_pure_dict(model.params)
    if not _on(pure, param_shardings(cfg, device_mesh)):
        return shard_params(model, replica)
    return _with_params(model, jax.tree.map(_row_view, pure, param_shardings(cfg, replica)))


def log_placement(cfg: ModelConfig, mesh: Mesh):
    log.info("%s", describe_placement(cfg, mesh))
