"""Meshes: `--mesh tp=N[,dp=M]` parsed once (mesh.py), the one logical-axis table (rules.py), the
LogicalMesh that places and splits arrays by logical axis names (logical.py), and where weights,
KV pages and replicas go (placement.py)."""
from jaxserve.parallel.logical import LogicalMesh
from jaxserve.parallel.mesh import (
    MESH_AXES,
    DisaggMeshSpec,
    MeshSpec,
    as_mesh_spec,
    check_engine_mesh,
    device_mesh,
    parse_deployment,
    parse_mesh,
    replica_meshes,
    single_engine_mesh,
)
from jaxserve.parallel.placement import (
    log_placement,
    logical_mesh,
    param_axes,
    param_shardings,
    place,
    replica_view,
    shard_params,
)
from jaxserve.parallel.rules import LOGICAL_AXIS_RULES, describe_placement, mesh_axis, num_shards, partition_spec

__all__ = ["DisaggMeshSpec", "LOGICAL_AXIS_RULES", "LogicalMesh", "MESH_AXES", "MeshSpec", "as_mesh_spec", "check_engine_mesh",
           "describe_placement", "device_mesh", "log_placement", "logical_mesh", "mesh_axis", "num_shards",
           "param_axes", "param_shardings", "parse_deployment", "parse_mesh", "partition_spec", "place", "replica_meshes",
           "replica_view", "shard_params", "single_engine_mesh"]
