"""The grouped matmul as one Mosaic TPU kernel (megablox style). Contract and schedule: common.py.

Layout and grid:
    lhs        [M_pad, K_pad] in VMEM blocks [tm, tk], block (fetch_tile[v], k)
    rhs        [G, K_pad, N_pad] in VMEM blocks [tk, tn] of one group, block (group[v], k, n)
    out        [M_pad, N_pad] in VMEM blocks [tm, tn], block (tile[v], n)
    grid       (N_pad / tn, visits, K_pad / tk); the schedule arrives by scalar prefetch (SMEM).
For each visit the K loop accumulates lhs @ rhs[group] into a float32 VMEM scratch [tm, tn]; at
the last K step the rows of the visit's group are merged into the output block and the others
are left as they are. Visits of one tile are consecutive, so their output block stays in VMEM
across them and is written back once, when the tile changes; the first visit of a tile zeroes
it, which is how rows owned by no group (past the total, and tiles past it) come out zero. The
visit and K axes are "arbitrary" (they revisit an output block); N is "parallel".

Row-less visits (zero-fill and padding) skip the dot, and their index maps repeat the block
indices of the last active visit at its last K step, so the pipeline fetches nothing for them.
M, K and N are zero-padded outside the kernel to multiples of the tiles (a no-op when they
divide, the usual case for bucketed tokens and model widths).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.moe.common import check_operands, make_group_metadata, pad_operands


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def _kernel(tile_ref, group_ref, fetch_ref, lo_ref, hi_ref, first_ref,
            lhs_ref, rhs_ref, out_ref, acc_ref, *, tm: int, nk: int, precision):
    del group_ref, fetch_ref  # used by the index maps only
    v, k = pl.program_id(1), pl.program_id(2)
    lo, hi = lo_ref[v], hi_ref[v]

    @pl.when((k == 0) & (first_ref[v] == 1))
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    @pl.when(hi > lo)
    def _():
        part = jnp.dot(lhs_ref[...], rhs_ref[...], precision=precision,
                       preferred_element_type=jnp.float32)  # [tm, tn]

        @pl.when(k == 0)
        def _():
            acc_ref[...] = part

        @pl.when(k > 0)
        def _():
            acc_ref[...] += part

        @pl.when(k == nk - 1)
        def _():
            rows = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)  # [tm, tn]
            mine = (rows >= lo) & (rows < hi)
            out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def _specs(tm: int, tk: int, tn: int, nk: int):
    """BlockSpecs of lhs, rhs and out; index maps take (n, v, k, *schedule refs)."""
    def k_of(v, k, lo, hi):  # row-less visits stay on the last K block: no new fetch
        return jnp.where(hi[v] > lo[v], k, nk - 1)

    def lhs_map(n, v, k, tile, group, fetch, lo, hi, first):
        return fetch[v], k_of(v, k, lo, hi)

    def rhs_map(n, v, k, tile, group, fetch, lo, hi, first):
        return group[v], k_of(v, k, lo, hi), n

    def out_map(n, v, k, tile, group, fetch, lo, hi, first):
        return tile[v], n

    return (pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((pl.squeezed, tk, tn), rhs_map),
            pl.BlockSpec((tm, tn), out_map))


def gmm_tpu(lhs, rhs, group_sizes, *, tiling=(128, 128, 128), preferred_element_type=jnp.float32,
            interpret=None):
    """lhs [M, K], rhs [G, K, N], group_sizes [G] int32 -> [M, N] in preferred_element_type.
    tiling = (tm, tk, tn), clipped to the shape (tm to M rounded up to 8, 16 for 16-bit lhs); on a TPU keep tm a
    multiple of 8 (16 for bfloat16) and tk, tn multiples of 128 or the whole K / N."""
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    check_operands(lhs, rhs, group_sizes)
    (m, k), n = lhs.shape, rhs.shape[2]
    sublanes = 8 * 4 // lhs.dtype.itemsize if lhs.dtype.itemsize < 4 else 8   # bfloat16 packs 16 rows a tile
    tm, tk, tn = min(tiling[0], _round_up(m, sublanes)), min(tiling[1], k), min(tiling[2], n)
    m_pad, k_pad, n_pad = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs, rhs = pad_operands(lhs, rhs, m_pad, k_pad, n_pad)
    meta = make_group_metadata(group_sizes, m_pad, tm)
    schedule = (meta.tile, meta.group, meta.fetch_tile, meta.lo, meta.hi, meta.first)
    nk = k_pad // tk
    lhs_spec, rhs_spec, out_spec = _specs(tm, tk, tn, nk)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(schedule), grid=(n_pad // tn, meta.tile.shape[0], nk),
        in_specs=[lhs_spec, rhs_spec], out_specs=out_spec,
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)])
    precision = lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    out = pl.pallas_call(
        functools.partial(_kernel, tm=tm, nk=nk, precision=precision), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), preferred_element_type),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret, name="gmm_tpu",
    )(*schedule, lhs, rhs)
    return out[:m, :n]
