"""LogicalMesh: a device mesh plus where each logical axis goes on it for one model — the one object
that places arrays and splits computations by logical axis names (from the table in rules.py).

It is static (hashable), so jitted steps take it as a static argument. Call sites name logical
axes only, e.g. `lmesh.sharding(("layers", "embed", "ffw"))` or, for a computation that runs per
shard, `lmesh.shard_map(fn, in_axes=(("tokens", "kv_heads", "head_dim"), ...), out_axes=...)`.
An "axes" argument is a tuple of logical axis names for one array, () for a replicated value (of
any structure), or a pytree (a KVPages, a dict) whose leaves are such tuples.
"""
from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import ModelConfig
from jaxserve.parallel.rules import LOGICAL_AXIS_RULES, mesh_axis, spec_of


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


@dataclasses.dataclass(frozen=True)
class LogicalMesh:
    mesh: Mesh
    rules: tuple[tuple[str, str | None], ...]  # logical axis -> mesh axis for this model (None: replicated)

    @classmethod
    def build(cls, cfg: ModelConfig, mesh: Mesh) -> LogicalMesh:
        """Resolves the table for `cfg` on `mesh`: an axis splits only where its count divides."""
        return cls(mesh, tuple((logical, mesh_axis(logical, cfg, mesh)) for logical in LOGICAL_AXIS_RULES))

    @property
    def splits(self) -> bool:
        """Whether anything is split at all (a one-device mesh only places)."""
        return self.mesh.size > 1

    def mesh_axis(self, logical: str) -> str | None:
        """The mesh axis `logical` is split over for this model, or None (replicated)."""
        return dict(self.rules)[logical]

    def spec(self, logical_axes: tuple[str, ...]) -> PartitionSpec:
        """A mesh axis is used once at most: a later logical axis mapping to it is replicated."""
        table = dict(self.rules)
        missing = [a for a in logical_axes if a not in table]
        if missing:
            raise ValueError(f"no sharding rule for logical axis {missing[0]!r} (add it to LOGICAL_AXIS_RULES)")
        return spec_of(table[a] for a in logical_axes)

    def specs(self, axes_tree):
        return jax.tree.map(self.spec, axes_tree, is_leaf=_is_axes)

    def sharding(self, logical_axes: tuple[str, ...] = ()) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))

    def shardings(self, axes_tree):
        return jax.tree.map(self.sharding, axes_tree, is_leaf=_is_axes)

    def shard_map(self, fn, in_axes: tuple, out_axes):
        """fn run once per device on its shards; in_axes has one entry per positional argument."""
        return jax.shard_map(fn, mesh=self.mesh, in_specs=tuple(self.specs(a) for a in in_axes),
                             out_specs=self.specs(out_axes),
                             check_vma=False)  # Pallas kernels do not track varying axes
