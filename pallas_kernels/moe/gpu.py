"""The grouped matmul as a Pallas kernel for GPUs (Triton). Contract and schedule: common.py.

    grid   (visits, N_pad / block_n): one program per (visit, column block)
A program of an active visit runs a K loop over [block_m, block_k] x [block_k, block_n] dots of
its row tile against its group's rhs, accumulating in float32 registers, and stores the rows of
its group with a masked store. Programs of a tile that straddles groups thus write disjoint rows
of the same block, and the rows no group owns (past the total) are written as zeros by the first
visit of their tile only, a zero-fill visit for tiles entirely past it. So every output element
has exactly one writer: no zero-initialized output, no atomics, and no pass combining partial
outputs. Padding visits do nothing.

Triton wants power-of-two block dims, >= 16 for its dots: blocks are clipped to the shape (the
next power of two, at least 16) and M, K, N are zero-padded outside to multiples of them.
float32 operands use float32 dots (precision HIGHEST: Triton's default there is tf32); bfloat16
ones multiply exactly into the float32 accumulator.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.moe.common import check_operands, make_group_metadata, pad_operands


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def _kernel(tile_ref, group_ref, lo_ref, hi_ref, first_ref, total_ref, lhs_ref, rhs_ref, out_ref, *,
            bm: int, bn: int, bk: int, nk: int, precision):
    v, n = pl.program_id(0), pl.program_id(1)
    lo, hi, first, total = lo_ref[v], hi_ref[v], first_ref[v], total_ref[0]
    r0 = tile_ref[v] * bm
    rows = r0 + jnp.arange(bm, dtype=jnp.int32)  # [bm] global row indices
    out_block = out_ref.at[pl.ds(r0, bm), pl.ds(n * bn, bn)]
    unowned = (first == 1) & (rows >= total)  # rows this program zeroes

    @pl.when(hi > lo)
    def _():
        g = group_ref[v]

        def k_step(kk, acc):
            a = lhs_ref[pl.ds(r0, bm), pl.ds(kk * bk, bk)]         # [bm, bk]
            b = rhs_ref[g, pl.ds(kk * bk, bk), pl.ds(n * bn, bn)]  # [bk, bn]
            return acc + jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, nk, k_step, jnp.zeros((bm, bn), jnp.float32))
        mine = (rows >= lo) & (rows < hi)
        val = jnp.where(mine[:, None], acc, 0.0).astype(out_ref.dtype)
        plgpu.store(out_block, val, mask=jnp.broadcast_to((mine | unowned)[:, None], (bm, bn)))

    @pl.when((hi <= lo) & (first == 1))
    def _():  # a zero-fill visit: a tile past the total
        zeros = jnp.zeros((bm, bn), out_ref.dtype)
        plgpu.store(out_block, zeros, mask=jnp.broadcast_to(unowned[:, None], (bm, bn)))


def gmm_gpu(lhs, rhs, group_sizes, *, block_m: int = 64, block_n: int = 64, block_k: int = 32,
            preferred_element_type=jnp.float32, interpret: bool = False, num_warps: int = 4,
            num_stages: int = 2):
    """lhs [M, K], rhs [G, K, N], group_sizes [G] int32 -> [M, N] in preferred_element_type.
    Blocks are powers of two, clipped to the shape; compiled (not interpreted) they must be >= 16."""
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    check_operands(lhs, rhs, group_sizes)
    (m, k), n = lhs.shape, rhs.shape[2]
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if b != _pow2(b) or (not interpret and b < 16):
            raise ValueError(f"{name} must be a power of two (>= 16 compiled), got {b}")
    bm, bn, bk = (min(b, max(16, _pow2(d))) for b, d in ((block_m, m), (block_n, n), (block_k, k)))
    m_pad, k_pad, n_pad = _round_up(m, bm), _round_up(k, bk), _round_up(n, bn)
    lhs, rhs = pad_operands(lhs, rhs, m_pad, k_pad, n_pad)
    meta = make_group_metadata(group_sizes, m_pad, bm)
    precision = lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, bm=bm, bn=bn, bk=bk, nk=k_pad // bk, precision=precision)
    out = pl.pallas_call(
        kernel, grid=(meta.tile.shape[0], n_pad // bn),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), preferred_element_type),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="gmm_gpu",
    )(meta.tile, meta.group, meta.lo, meta.hi, meta.first, meta.total, lhs, rhs)
    return out[:m, :n]
