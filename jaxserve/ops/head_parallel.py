"""Attention over a device mesh: one layer's KV-cache write and attention run inside shard_map, each
device on its own kv heads and the query heads that read them.

Attention is independent per kv head, so this needs no communication. Inside, every array is
local, so the paged gathers and scatters of the XLA path and the Pallas kernels run unchanged
(left to GSPMD, reshaping whole caches into page rows would gather them on every device). When kv
heads do not split over the mesh the specs are replicated: every device runs all heads.
"""
from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels.kv_quant import KVPages


@dataclasses.dataclass(frozen=True)
class HeadParallel:
    """Static (hashable) description of the split, built by jaxserve.parallel from its axis table."""
    mesh: Mesh
    heads: PartitionSpec     # q, k, v and the output [tokens, heads, head_dim]
    pages: PartitionSpec     # codes and block scales [layers, pages, page_size, kv_heads, ...]
    channels: PartitionSpec  # channel scales and key centers [layers, kv_heads, head_dim]

    def kv_specs(self, kv: KVPages) -> KVPages:
        """The spec of each array of `kv` (None where its format has no such array)."""
        def spec(array, s):
            return None if array is None else s

        return KVPages(spec(kv.k, self.pages), spec(kv.v, self.pages), spec(kv.k_scale, self.pages),
                       spec(kv.v_scale, self.pages), spec(kv.k_chan, self.channels), spec(kv.v_chan, self.channels),
                       spec(kv.k_center, self.channels))

    def __call__(self, fn, q, k, v, kv: KVPages, *shared):
        """fn(q, k, v, kv, *shared) -> (out [tokens, heads, head_dim], kv), run on each device's
        heads; `shared` (layer index, metadata) is replicated."""
        kv_specs = self.kv_specs(kv)
        every = PartitionSpec()
        mapped = jax.shard_map(fn, mesh=self.mesh, out_specs=(self.heads, kv_specs),
                               in_specs=(self.heads,) * 3 + (kv_specs,) + (every,) * len(shared),
                               check_vma=False)  # Pallas kernels do not track varying axes
        return mapped(q, k, v, kv, *shared)
