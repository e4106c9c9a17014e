"""What every implementation of the grouped matmul (MoE dispatch) contract shares.

    gmm(lhs [M, K], rhs [G, K, N], group_sizes [G] int32) -> out [M, N]
        (preferred_element_type, float32 by default)

Rows of lhs are sorted by group: group g owns rows [offset_g, offset_g + group_sizes[g]), where
offsets are the exclusive cumsum of group_sizes, and out[rows of g] = lhs[rows of g] @ rhs[g].
Groups may be empty. sum(group_sizes) may be < M: rows past the total belong to no group and are
zeros in the output (a bucket padded past the routed tokens). A total above M is clipped to M.
lhs and rhs share one dtype, float32 or bfloat16; accumulation is float32 either way.

Both kernels walk the same schedule of *visits*, built here from the traced group sizes so that
the grid stays static (jittable, one compilation per shape). A visit is one (row tile, group)
pair with rows of that group in that tile: a tile straddling a group boundary is visited once
per group it touches, and each visit keeps only its group's rows. In order:
    active visits    sorted by (tile, group), so visits of one tile are consecutive
    zero-fill visits one per tile entirely past the total (no group rows: written as zeros)
    padding visits   no rows at all; they repeat the last tile so they disturb nothing
Every tile gets at least one visit, and the count is bounded statically: each group after the
first that starts inside an already-visited tile adds one visit, so at most ceil(M/tm) + G - 1.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class GroupMetadata(NamedTuple):
    """The visit schedule; every field is [num_visits] int32 except `total` ([1] int32)."""
    tile: jnp.ndarray        # row tile the visit writes
    group: jnp.ndarray       # rhs group it multiplies by (for row-less visits: the last active one's)
    fetch_tile: jnp.ndarray  # row tile of lhs it reads; row-less visits repeat the last active one's
    #                          so that a pipelining kernel fetches nothing new for them
    lo: jnp.ndarray          # its group's rows are [lo, hi) (global row indices); lo == hi: none
    hi: jnp.ndarray
    first: jnp.ndarray       # 1 on the first visit of its tile (the one that zeroes what no group owns)
    total: jnp.ndarray       # rows owned by some group: sum(group_sizes), clipped to M


def num_visits(m: int, num_groups: int, tm: int) -> int:
    """The static length of the schedule: the most (tile, group) visits M rows can need."""
    return -(-m // tm) + num_groups - 1


def make_group_metadata(group_sizes, m: int, tm: int) -> GroupMetadata:
    """group_sizes [G] (traced or not) -> the visit schedule of M rows in tiles of tm rows."""
    sizes = jnp.asarray(group_sizes, jnp.int32)
    num_groups, tiles = sizes.shape[0], -(-m // tm)
    n = num_visits(m, num_groups, tm)
    ends = jnp.minimum(jnp.cumsum(sizes), m)  # [G]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    total = ends[-1]
    first_tile = starts // tm
    visits = jnp.where(ends > starts, (ends - 1) // tm - first_tile + 1, 0)  # [G] tiles group g touches
    visit_end = jnp.cumsum(visits)  # [G]
    active = visit_end[-1]

    v = jnp.arange(n, dtype=jnp.int32)
    # group of each visit by compare-and-sum (searchsorted would be a loop on device); G: none
    g = (visit_end[None, :] <= v[:, None]).sum(axis=1).astype(jnp.int32)
    gc = jnp.minimum(g, num_groups - 1)
    act_tile = first_tile[gc] + v - (visit_end[gc] - visits[gc])
    used_tiles = -(-total // tm)
    # past the active visits: one zero-fill visit per unused tile, then padding on the last tile
    idle_tile = jnp.minimum(used_tiles + v - active, tiles - 1)
    is_active = v < active
    tile = jnp.where(is_active, act_tile, idle_tile)
    last = jnp.maximum(active - 1, 0)  # the last active visit (or visit 0 when there is none)
    fetch_tile = jnp.where(is_active, act_tile, jnp.where(active > 0, act_tile[last], 0))
    group = jnp.where(is_active, gc, jnp.where(active > 0, gc[last], 0))
    lo = jnp.where(is_active, starts[gc], 0)
    hi = jnp.where(is_active, ends[gc], 0)
    first = jnp.concatenate([jnp.ones((1,), bool), tile[1:] != tile[:-1]]).astype(jnp.int32)
    return GroupMetadata(tile, group, fetch_tile, lo, hi, first, total.reshape(1))


def pad_operands(lhs, rhs, m_to: int, k_to: int, n_to: int):
    """Zero-pads lhs [M, K] -> [m_to, k_to] and rhs [G, K, N] -> [G, k_to, n_to] (a no-op when the
    tiles divide the shapes): zero K columns add nothing, extra rows and columns are sliced off."""
    m, k = lhs.shape
    n = rhs.shape[2]
    if (m, k) != (m_to, k_to):
        lhs = jnp.pad(lhs, ((0, m_to - m), (0, k_to - k)))
    if (k, n) != (k_to, n_to):
        rhs = jnp.pad(rhs, ((0, 0), (0, k_to - k), (0, n_to - n)))
    return lhs, rhs


def check_operands(lhs, rhs, group_sizes):
    """Raises ValueError on shapes or dtypes outside the contract (at trace time, not in a kernel)."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"want lhs [M, K] and rhs [G, K, N], got {lhs.shape} and {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes {group_sizes.shape} does not match {rhs.shape[0]} groups")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"lhs and rhs dtypes differ: {lhs.dtype} vs {rhs.dtype}")
