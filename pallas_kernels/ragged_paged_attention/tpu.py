"""Ragged paged attention as one Mosaic TPU kernel: mixed prefill and decode sequences in one
flat batch of query tokens, over the paged (possibly quantized) KV cache. Contract: common.py.

Layout and grid:
    q, out     [kv_heads, tokens_padded * group, head_dim] float32 (the folded query, one row per
               (token, query head of this kv head), token-major), in VMEM blocks of
               [heads_per_block, q_block * group, head_dim]
    k, v       [layers, num_pages, page_size, kv_heads, head_dim or head_dim/2] codes left in HBM
               (+ [..., head_dim/group] block scales for 4-bit formats)
    grid       (kv_heads / heads_per_block, tokens_padded / q_block), every point independent.
A grid point owns q_block tokens, which may belong to several sequences (many decodes, or the end
of one prefill and the start of the next). It walks those sequences (the first one comes from a
small scalar-prefetched table) and, for each, streams that sequence's KV blocks of
pages_per_block pages from HBM into double-buffered VMEM scratch (the copy of block j+1 starts
before block j is computed), dequantizes each block and runs an online softmax in float32 for
all query heads of a kv head at once (GQA), over only the rows of its own tokens. It reads only
the pages the sequence uses, and only the blocks its tokens can see (causal and sliding window).
Tokens past cu_q_lens[num_seqs] belong to no sequence and stay zero.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kv_quant import KVFormat, KVPages, dequantize
from pallas_kernels.ragged_paged_attention.common import fold_query, unfold_output


@dataclasses.dataclass(frozen=True)
class _Cfg:
    fmt: KVFormat
    group: int            # query heads per kv head
    heads_per_block: int  # kv heads per grid point
    q_block: int          # tokens per grid point
    pages_per_block: int
    page_size: int
    max_pages: int        # page table width
    sliding_window: int | None
    soft_cap: float | None

    @property
    def rows(self) -> int:
        return self.q_block * self.group

    @property
    def kv_block(self) -> int:
        return self.pages_per_block * self.page_size


def _block_copies(cfg: _Cfg, hbm_refs, bufs, sem, tables_ref, seq, layer, block, slot, h0):
    """The DMAs of KV block `block` of sequence `seq` into `slot` of the buffers: one per page
    per array (codes and scales of keys and values), each with the condition that the sequence
    uses that page."""
    copies = []
    for i in range(cfg.pages_per_block):
        p = block * cfg.pages_per_block + i
        page = tables_ref[seq * cfg.max_pages + jnp.minimum(p, cfg.max_pages - 1)]
        for hbm, buf in zip(hbm_refs, bufs, strict=True):
            src = hbm.at[layer, page, :, pl.ds(h0, cfg.heads_per_block)]  # [page_size, hb, C]
            copies.append((p, pltpu.make_async_copy(src, buf.at[slot, i], sem.at[slot])))
    return copies


def _run(copies, n_pages, method: str):
    """Starts or waits for ("start"/"wait") the copies of pages the sequence uses (p < n_pages)."""
    for p, copy in copies:
        pl.when(p < n_pages)(getattr(copy, method))


def _dot_nt(a, b):
    """a [M, D] . b [N, D] -> [M, N] float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _load_block(cfg: _Cfg, bufs, slot, h):
    """Keys and values of kv head h of one buffered block -> float32 [kv_block, head_dim] each."""
    def take(buf):  # [pages_per_block, page_size, C] -> [kv_block, C]
        x = buf[slot, :, :, h, :]
        return x.reshape((cfg.kv_block, x.shape[-1]))

    if cfg.fmt.group is None:
        kc, vc = bufs
        return dequantize(take(kc), None, cfg.fmt), dequantize(take(vc), None, cfg.fmt)
    kc, vc, ks, vs = bufs
    return dequantize(take(kc), take(ks), cfg.fmt), dequantize(take(vc), take(vs), cfg.fmt)


def _attend_block(cfg: _Cfg, q_ref, bufs, m_ref, l_ref, acc_ref, slot, block, q_pos, kv_len):
    """One online-softmax step of every head of the grid point against one buffered KV block.
    q_pos [rows, 1] is each row's position, -1 for rows not of this sequence."""
    start = block * cfg.kv_block
    key_pos = start + lax.broadcasted_iota(jnp.int32, (1, cfg.kv_block), 1)  # [1, kvb]
    visible = key_pos <= q_pos  # [rows, kvb]
    if cfg.sliding_window is not None:
        visible &= key_pos > q_pos - cfg.sliding_window
    # [kvb, 1]: slots past kv_len (a last page's tail) may hold garbage, even NaN
    key_ok = start + lax.broadcasted_iota(jnp.int32, (cfg.kv_block, 1), 0) < kv_len
    for h in range(cfg.heads_per_block):
        k, v = _load_block(cfg, bufs, slot, h)  # [kvb, D]
        s = _dot_nt(q_ref[h], k)  # [rows, kvb]
        if cfg.soft_cap is not None:
            s = cfg.soft_cap * jnp.tanh(s / cfg.soft_cap)
        s = jnp.where(visible, s, -jnp.inf)
        m_prev = m_ref[h]  # [rows, 1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        safe_m = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that see nothing yet
        p = jnp.exp(s - safe_m)
        corr = jnp.exp(m_prev - safe_m)
        m_ref[h] = m_new
        l_ref[h] = l_ref[h] * corr + p.sum(axis=1, keepdims=True)
        pv = jnp.dot(p, jnp.where(key_ok, v, 0.0), preferred_element_type=jnp.float32)
        acc_ref[h] = acc_ref[h] * corr + pv


def _attend_sequence(cfg: _Cfg, refs, seq, b, layer, h0):
    """Attention of the rows of grid point (h0, b) that belong to sequence `seq`."""
    cu_ref, lens_ref, tables_ref, q_ref, hbm_refs, o_ref, bufs, sem, m_ref, l_ref, acc_ref = refs
    q_start, q_end, kv_len = cu_ref[seq], cu_ref[seq + 1], lens_ref[seq]
    b0 = b * cfg.q_block
    t0, t1 = jnp.maximum(q_start, b0), jnp.minimum(q_end, b0 + cfg.q_block)  # its tokens here

    @pl.when(t1 > t0)
    def _():
        offset = kv_len - (q_end - q_start) - q_start  # position = token + offset
        token = b0 + lax.broadcasted_iota(jnp.int32, (cfg.rows, 1), 0) // cfg.group  # [rows, 1]
        mine = (token >= t0) & (token < t1)
        q_pos = jnp.where(mine, token + offset, -1)
        first = 0 if cfg.sliding_window is None else jnp.maximum(t0 + offset - cfg.sliding_window + 1, 0)
        j0, j1 = first // cfg.kv_block, (t1 - 1 + offset) // cfg.kv_block + 1
        n_pages = pl.cdiv(kv_len, cfg.page_size)
        fetch = functools.partial(_block_copies, cfg, hbm_refs, bufs, sem, tables_ref, seq, layer, h0=h0)
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        _run(fetch(j0, 0), n_pages, "start")

        def kv_step(j, carry):
            slot = (j - j0) % 2

            @pl.when(j + 1 < j1)
            def _():
                _run(fetch(j + 1, 1 - slot), n_pages, "start")  # overlaps the compute below

            _run(fetch(j, slot), n_pages, "wait")
            _attend_block(cfg, q_ref, bufs, m_ref, l_ref, acc_ref, slot, j, q_pos, kv_len)
            return carry

        lax.fori_loop(j0, j1, kv_step, 0)
        for h in range(cfg.heads_per_block):
            norm = l_ref[h]  # [rows, 1]; 0 only for rows not of this sequence
            out = acc_ref[h] / jnp.where(norm > 0, norm, 1.0)
            o_ref[h] = jnp.where(mine, out, o_ref[h])


def _kernel(cu_ref, lens_ref, tables_ref, meta_ref, first_ref, q_ref, *rest, cfg: _Cfg):
    """meta_ref = [num_seqs, layer]; first_ref [q blocks] = first sequence with tokens in a block."""
    n = 2 if cfg.fmt.group is None else 4
    hbm_refs, (o_ref,), scratch = rest[:n], rest[n:n + 1], rest[n + 1:]
    bufs, (sem, m_ref, l_ref, acc_ref) = scratch[:n], scratch[n:]
    h0, b = pl.program_id(0) * cfg.heads_per_block, pl.program_id(1)
    num_seqs, layer = meta_ref[0], meta_ref[1]
    refs = (cu_ref, lens_ref, tables_ref, q_ref, hbm_refs, o_ref, bufs, sem, m_ref, l_ref, acc_ref)
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    def more(seq):  # sequences are in token order, so stop at the first starting past this block
        return (seq < num_seqs) & (cu_ref[seq] < (b + 1) * cfg.q_block)

    def step(seq):
        _attend_sequence(cfg, refs, seq, b, layer, h0)
        return seq + 1

    lax.while_loop(more, step, first_ref[b])


def _scalar_prefetch(kv_lens, page_tables, cu_q_lens, num_seqs, layer, n_blocks: int, q_block: int):
    """The kernel's SMEM operands: cu_q_lens, kv_lens, the flattened page tables, [num_seqs, layer],
    and per query block the first sequence with tokens in it."""
    seqs = page_tables.shape[0]
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(-1)[0]
    cu = jnp.asarray(cu_q_lens, jnp.int32)
    cu = jnp.where(jnp.arange(seqs + 1) <= num_seqs, cu, cu[num_seqs])  # padding slots: empty
    starts = jnp.arange(n_blocks, dtype=jnp.int32) * q_block
    first = jnp.clip(jnp.searchsorted(cu, starts, side="right") - 1, 0, seqs).astype(jnp.int32)
    meta = jnp.stack([num_seqs, jnp.asarray(layer, jnp.int32).reshape(())])
    return cu, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(page_tables, jnp.int32).reshape(-1), meta, first


def _call(cfg: _Cfg, prefetch, qg, hbm_arrays, interpret):
    """qg [kv_heads, tokens_padded * group, D] -> the same shape, attended."""
    kv_heads, rows_total, head_dim = qg.shape
    hb, ppb = cfg.heads_per_block, cfg.pages_per_block
    q_spec = pl.BlockSpec((hb, cfg.rows, head_dim), lambda h, b, *_: (h, b, 0))
    scratch = [pltpu.VMEM((2, ppb, cfg.page_size, hb, a.shape[-1]), a.dtype) for a in hbm_arrays]
    scratch += [pltpu.SemaphoreType.DMA((2,)), pltpu.VMEM((hb, cfg.rows, 1), jnp.float32),
                pltpu.VMEM((hb, cfg.rows, 1), jnp.float32), pltpu.VMEM((hb, cfg.rows, head_dim), jnp.float32)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(kv_heads // hb, rows_total // cfg.rows),
        in_specs=[q_spec] + [pl.BlockSpec(memory_space=pl.ANY)] * len(hbm_arrays),
        out_specs=q_spec, scratch_shapes=scratch)
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
    )(*prefetch, qg, *hbm_arrays)


def ragged_paged_attention_tpu(q, kv: KVPages, layer, kv_lens, page_tables, cu_q_lens, num_seqs, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, interpret=None, q_block: int = 32,
                               pages_per_block: int | None = None, kv_heads_per_block: int | None = None):
    """q [tokens, heads, head_dim] -> [tokens, heads, head_dim] in q.dtype (see common.py).
    Tuning: q_block tokens per grid point; pages_per_block pages per KV block (default: about 128
    tokens); kv_heads_per_block kv heads per grid point (default all: whole page rows per DMA)."""
    fmt, page_size = kv.format, kv.page_size
    tokens, heads, head_dim = q.shape
    kv_heads, max_pages = kv.k.shape[3], page_tables.shape[1]
    hb = kv_heads_per_block or kv_heads
    if kv_heads % hb or heads % kv_heads:
        raise ValueError(f"heads {heads}, kv_heads {kv_heads}, kv_heads_per_block {hb} do not divide")
    ppb = pages_per_block or max(1, min(128 // page_size, max_pages))
    cfg = _Cfg(fmt, heads // kv_heads, hb, q_block, ppb, page_size, max_pages, sliding_window, soft_cap)

    n_blocks = pl.cdiv(tokens, q_block)
    qg = fold_query(q, kv, layer, sm_scale)  # [T, kvh, g, D]
    qg = jnp.pad(qg, ((0, n_blocks * q_block - tokens), (0, 0), (0, 0), (0, 0)))
    qg = qg.transpose(1, 0, 2, 3).reshape(kv_heads, n_blocks * cfg.rows, head_dim)
    prefetch = _scalar_prefetch(kv_lens, page_tables, cu_q_lens, num_seqs, layer, n_blocks, q_block)
    hbm_arrays = (kv.k, kv.v) if fmt.group is None else (kv.k, kv.v, kv.k_scale, kv.v_scale)
    out = _call(cfg, prefetch, qg, hbm_arrays, interpret)
    out = out.reshape(kv_heads, n_blocks * q_block, cfg.group, head_dim).transpose(1, 0, 2, 3)[:tokens]
    return unfold_output(out, kv, layer, q.dtype)
