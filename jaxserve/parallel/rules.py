"""The one table from logical axes to mesh axes, and the rule that keeps it safe.

Parameters name their axes in `ParamSpec.logical_axes`, and the KV pages and attention's
activations theirs (KV_PAGE_AXES, ATTENTION_HEAD_AXES), all in jaxserve/models/transformer.py. A
logical axis is split over its mesh axis only when its count divides evenly by the mesh axis size
(counted in heads for q_heads / kv_heads, so a split never cuts a head); otherwise it is replicated.
Query heads split with q_heads in the projections, but inside attention they follow kv_heads, so
each device holds whole GQA groups with their keys and values.
"""
from __future__ import annotations

from collections.abc import Callable

from jax.sharding import Mesh, PartitionSpec

from jaxserve.config import ModelConfig
from jaxserve.parallel.mesh import EP, TP

LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "q_heads": TP,     # column-parallel wq (and its bias), row-parallel wo: one all-reduce
    "kv_heads": TP,    # wk, wv, the KV pages and their channel scales: attention runs per device
    "ffw": TP,         # column-parallel gate/up, row-parallel down: one all-reduce
    "vocab": TP,       # embedding rows and lm_head columns; logits are gathered for sampling
    "experts": EP,     # MoE: each ep group holds its experts (jaxserve/ops/moe.py sums the groups)
    "moe_ffw": TP,     # and splits each expert's FFN width over tp, as a dense FFN
    "shared_ffw": TP,  # Qwen2-MoE's shared expert: a dense FFN of its own width
    "router": None,    # router columns (one per expert): every device routes every token
    "embed": None,
    "layers": None,
    "head_dim": None,
    "tokens": None,      # activations: every device sees the whole flat token batch
    "pages": None,       # KV pages [layers, pages, page_slots, kv_heads, head_dim]
    "page_slots": None,
}
# No logical axis maps to dp: its rows are engine replicas, and each holds whole copies.

# The count that must divide evenly for a logical axis to be split.
LOGICAL_AXIS_COUNTS: dict[str, Callable[[ModelConfig], int]] = {
    "q_heads": lambda cfg: cfg.num_heads,
    "kv_heads": lambda cfg: cfg.num_kv_heads,
    "ffw": lambda cfg: cfg.intermediate_size if any(g.kind == "dense" for g in cfg.layer_groups) else 0,
    "vocab": lambda cfg: cfg.vocab_size,
    "experts": lambda cfg: cfg.num_experts,
    "moe_ffw": lambda cfg: cfg.moe_intermediate_size,
    "shared_ffw": lambda cfg: cfg.shared_expert_intermediate_size,
}


def mesh_axis(logical: str, cfg: ModelConfig, mesh: Mesh | None) -> str | None:
    """The mesh axis `logical` is split over on `mesh`, or None (replicated)."""
    if logical not in LOGICAL_AXIS_RULES:
        raise ValueError(f"no sharding rule for logical axis {logical!r} (add it to LOGICAL_AXIS_RULES)")
    axis = LOGICAL_AXIS_RULES[logical]
    if mesh is None or axis is None or mesh.shape.get(axis, 1) == 1:
        return None
    count = LOGICAL_AXIS_COUNTS[logical](cfg)
    return axis if count and count % mesh.shape[axis] == 0 else None


def num_shards(logical: str, cfg: ModelConfig, mesh: Mesh | None) -> int:
    """How many pieces `logical` is split into on `mesh` (1: replicated)."""
    axis = mesh_axis(logical, cfg, mesh)
    return 1 if axis is None else mesh.shape[axis]


def spec_of(mesh_axes) -> PartitionSpec:
    """Mesh axes (or None) per array axis -> PartitionSpec, each mesh axis used once at most: a later
    array axis mapping to an already used mesh axis is replicated."""
    used, spec = set(), []
    for axis in mesh_axes:
        spec.append(None if axis in used else axis)
        used.add(axis)
    return PartitionSpec(*spec)


def partition_spec(logical_axes: tuple[str, ...], cfg: ModelConfig, mesh: Mesh | None) -> PartitionSpec:
    """PartitionSpec of an array with these logical axes on `mesh`."""
    return spec_of(mesh_axis(logical, cfg, mesh) for logical in logical_axes)


def describe_placement(cfg: ModelConfig, mesh: Mesh) -> str:
    """One line: the mesh, and which counted axes are split or replicated (and why)."""
    devices = ",".join(str(d.id) for d in mesh.devices.flat)
    split, kept = [], []
    for logical, count in LOGICAL_AXIS_COUNTS.items():
        n, axis = count(cfg), LOGICAL_AXIS_RULES[logical]
        if n == 0:  # the model has no such axis (a dense model's experts)
            continue
        if mesh_axis(logical, cfg, mesh) is not None:
            split.append(f"{logical} {n}/{mesh.shape[axis]}")
        else:
            size = mesh.shape.get(axis, 1) if axis else 1
            kept.append(logical if size == 1 else f"{logical} ({n} not divisible by {axis}={size})")
    kept += [logical for logical, axis in LOGICAL_AXIS_RULES.items()
             if axis is None and (logical != "router" or cfg.num_experts)]
    return (f"mesh {dict(mesh.shape)} on devices [{devices}]: split {', '.join(split) or 'nothing'}; "
            f"replicated {', '.join(kept)}")
