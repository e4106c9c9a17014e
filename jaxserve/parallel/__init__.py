"""Tensor-parallel meshes: `--mesh tp=N[,dp=M]` parsing, replica meshes, and the placement of every
array the engine holds, all derived from one logical-axis table (rules.py)."""
from jaxserve.parallel.mesh import (
    MeshSpec,
    check_engine_mesh,
    parse_mesh,
    replica_meshes,
    single_engine_mesh,
)
from jaxserve.parallel.placement import (
    head_parallel,
    kv_shardings,
    log_placement,
    param_shardings,
    shard_params,
)
from jaxserve.parallel.rules import (
    LOGICAL_AXIS_RULES,
    describe_placement,
    mesh_axis,
    num_shards,
    partition_spec,
    replicated,
)

__all__ = ["LOGICAL_AXIS_RULES", "MeshSpec", "check_engine_mesh", "describe_placement", "head_parallel",
           "kv_shardings", "log_placement", "mesh_axis", "num_shards", "param_shardings", "parse_mesh",
           "partition_spec", "replica_meshes", "replicated", "shard_params", "single_engine_mesh"]
