"""Ragged paged attention as a Pallas kernel for GPUs (Triton), split-KV (flash-decoding style).

The batch is cut into query blocks: `q_block` consecutive tokens of one sequence times all query
heads of one kv head (the GQA group, padded to a power of two), i.e. R = q_block * group rows.
Each program handles one (query block, kv head, kv split): it walks its share of the blocks of
`pages_per_block` pages the block can see, dequantizing each KV block in registers, with an online
softmax in float32. Its normalized partial output and (max, sum) go to token-major buffers, and a
small XLA epilogue merges the splits. Block bookkeeping (which sequence, which tokens) is computed
outside the kernel from the traced lengths, so the grid is static and everything is jittable.

Triton wants power-of-two block dims and dots with every dim >= 16: R, the KV block and the head
dim halves are chosen so. 4-bit pages are never unpacked into one tensor (Triton concatenates only
[..., 1] pieces): channel d sits in the low nibble and d + D/2 in the high one, so the head dim is
kept as two halves throughout (scores add the two half dots, the output has two half accumulators).

Contract: common.py. Its tolerance (float32 summation order) needs float32-exact dots, and tensor
cores get them cheaply here: every KV format but float32 dequantizes exactly into bfloat16 (bf16,
fp8, int8, and int4 / nvfp4 codes x e4m3 scales have <= 8 significant bits), so only the small
operand (query, probabilities) is split into
`dot_pieces` bf16 pieces (3 give all 24 bits): sums of bf16 dots with exact products and float32
accumulation. `dot_pieces=1` is a plain bf16 kernel (faster, about bf16-accurate). float32 pages
use plain float32 dots.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kv_quant import KVFormat, KVPages, decode_float_codes, decode_scales, unpack_halves
from pallas_kernels.ragged_paged_attention.common import fold_query, unfold_output

TARGET_PROGRAMS = 528  # ~4 per SM of an H100 (132 SMs): enough splits to fill the GPU
MAX_SPLITS = 16


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_num_kv_splits(seq_slots: int, kv_heads: int, max_blocks: int) -> int:
    """Splits so that (sequences x kv heads x splits) programs fill the GPU a few times over."""
    return max(1, min(MAX_SPLITS, max_blocks, -(-TARGET_PROGRAMS // (seq_slots * kv_heads))))


def split_bf16(x, pieces: int):
    """float32 x -> `pieces` bfloat16 parts summing to x (3 parts: exactly). Each part is x with its
    low 16 bits masked off, a bit operation no compiler folds away (XLA's excess-precision rewrites
    drop f32 -> bf16 -> f32 round trips)."""
    parts = []
    for _ in range(pieces):
        hi = lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.int32) & -65536, jnp.float32)
        parts.append(hi.astype(jnp.bfloat16))
        x = x - hi
    return parts


def _e2m1_times_2_14(c):
    """4-bit e2m1 codes (int32, 0..15) -> float32 values / 2**14: the 3 magnitude bits become the
    low exponent bits and top mantissa bit of a float16 (zero and 0.5 land on its subnormals)."""
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return lax.bitcast_convert_type(bits.astype(jnp.int16), jnp.float16).astype(jnp.float32)


# ---- in-kernel helpers ------------------------------------------------------------------------

def _dots(a_parts, b_parts, pieces: int, contract_b: int):
    """sum of a_i @ b_j over i + j < pieces (the terms float32 accuracy needs) -> float32 [M, N].
    a_i [M, K]; b_j [N, K] (contract_b=1) or [K, N] (contract_b=0)."""
    dims = (((1,), (contract_b,)), ((), ()))
    prec = lax.Precision.HIGHEST if a_parts[0].dtype == jnp.float32 else None
    terms = [lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)
             for i, a in enumerate(a_parts) for j, b in enumerate(b_parts) if i + j < pieces]
    return functools.reduce(lambda x, y: x + y, terms[::-1])  # smallest terms first


def _kv_parts(codes_ref, scales_ref, layer, pages, head, fmt: KVFormat):
    """One KV block of `pages` of one kv head -> per head-dim half (two for 4-bit pages), the exact
    parts of its values, each [block, D/halves]: bf16 (one part), float32 pages
    as is. The channel scale stays folded out."""
    codes = codes_ref[layer, pages, :, head, :]  # [pages_per_block, page_size, D or D/2]
    codes = codes.reshape(codes.shape[0] * codes.shape[1], codes.shape[2])
    if not fmt.packed:
        vals = decode_float_codes(codes, fmt)  # bfloat16 / fp8 pages hold bits
        return [[vals if vals.dtype in (jnp.float32, jnp.bfloat16) else vals.astype(jnp.bfloat16)]]
    if fmt.name == "int4":
        halves, unit = list(unpack_halves(codes, fmt)), 1.0
    else:  # e2m1 without float selects (see _e2m1_times_2_14)
        c = codes.astype(jnp.int32)
        halves, unit = [_e2m1_times_2_14(c), _e2m1_times_2_14(lax.shift_right_logical(c, 4))], 2.0 ** 14
    ng = scales_ref.shape[-1] // 2  # block scales per half
    out = []
    for j, vals in enumerate(halves):
        s = decode_scales(scales_ref[layer, pages, :, head, pl.ds(j * ng, ng)], fmt) * unit
        s = s.reshape(vals.shape[0], ng, 1)
        s = jnp.broadcast_to(s, (vals.shape[0], ng, fmt.group)).reshape(vals.shape)
        out.append(split_bf16(vals * s, 1))
    return out


def _kernel(meta_ref, lens_ref, pt_ref, cu_ref, bseq_ref, bq0_ref, bqn_ref, q_ref, k_ref, v_ref,
            *rest, fmt: KVFormat, q_block: int, group: int, pages_per_block: int, num_splits: int,
            sliding_window, soft_cap, pieces: int):
    if fmt.packed:
        ks_ref, vs_ref, o_ref, m_ref, l_ref = rest
    else:
        (o_ref, m_ref, l_ref), ks_ref, vs_ref = rest, None, None
    b, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page_size, max_pages = k_ref.shape[2], pt_ref.shape[1]
    block_kv, rows = pages_per_block * page_size, q_block * group
    trash = o_ref.shape[1] - 1  # the extra token row rows past the block's tokens are written to
    halves = 2 if fmt.packed else 1
    dh = q_ref.shape[-1] // halves
    qn = bqn_ref[b]  # tokens in this block (0: no block)

    @pl.when(qn > 0)
    def _():
        seq, q0, layer = bseq_ref[b], bq0_ref[b], meta_ref[0]
        kv_len, seq_q0 = lens_ref[seq], cu_ref[seq]
        p0 = kv_len - (cu_ref[seq + 1] - seq_q0) + (q0 - seq_q0)  # position of the block's 1st token
        lo = 0 if sliding_window is None else jnp.maximum(p0 - sliding_window + 1, 0)
        kb_lo, kb_hi = lo // block_kv, (p0 + qn + block_kv - 1) // block_kv
        per = (kb_hi - kb_lo + num_splits - 1) // num_splits
        start = kb_lo + split * per
        end = jnp.minimum(kb_hi, start + per)
        used_pages = (kv_len + page_size - 1) // page_size

        t = jnp.arange(q_block, dtype=jnp.int32)
        q_tok = q0 + jnp.minimum(t, qn - 1)
        qs = [[q_ref[i, q_tok, head, :, pl.ds(j * dh, dh)].reshape(rows, dh) for i in range(q_ref.shape[0])]
              for j in range(halves)]  # [half][piece] -> [R, D/halves]
        row_pos = p0 + jnp.arange(rows, dtype=jnp.int32) // group  # [R]

        def body(kb, carry):
            m, l, accs = carry
            slots = kb * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32)
            pages = pt_ref[seq, jnp.minimum(slots, max_pages - 1)]
            pages = jnp.where(slots < used_pages, pages, 0)  # slots past the sequence: null page
            ks = _kv_parts(k_ref, ks_ref, layer, pages, head, fmt)
            vs = _kv_parts(v_ref, vs_ref, layer, pages, head, fmt)
            s = sum(_dots(qj, kj, pieces, 1) for qj, kj in zip(qs, ks))  # [R, BK]
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            k_pos = kb * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
            visible = k_pos[None, :] <= row_pos[:, None]
            if sliding_window is not None:
                visible &= k_pos[None, :] > row_pos[:, None] - sliding_window
            s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[:, None])
            ps = [p] if fmt.name == "float32" else split_bf16(p, pieces)
            accs = tuple(a * alpha[:, None] + _dots(ps, vj, pieces, 0) for a, vj in zip(accs, vs))
            return m_new, l * alpha + p.sum(axis=1), accs

        init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
                tuple(jnp.zeros((rows, dh), jnp.float32) for _ in range(halves)))
        m, l, accs = lax.fori_loop(start, end, body, init)
        inv = jnp.where(l > 0, 1.0 / l, 0.0)
        out_tok = jnp.where(t < qn, q0 + t, trash)
        for j, acc in enumerate(accs):
            o_ref[split, out_tok, head, :, pl.ds(j * dh, dh)] = (acc * inv[:, None]).reshape(q_block, group, dh)
        m_ref[split, out_tok, head, :] = m.reshape(q_block, group)
        l_ref[split, out_tok, head, :] = l.reshape(q_block, group)


# ---- host side --------------------------------------------------------------------------------

def _query_blocks(cu_q_lens, num_seqs, q_block: int, num_blocks: int):
    """Static list of query blocks from traced lengths -> (seq, first token, tokens) per block,
    each [num_blocks] int32; unused blocks have 0 tokens."""
    slots = cu_q_lens.shape[0] - 1
    q_lens = jnp.where(jnp.arange(slots) < num_seqs, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    ends = jnp.cumsum((q_lens + q_block - 1) // q_block)  # [slots] blocks up to and incl. seq s
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    # which sequence each block is in; a compare-and-sum, since searchsorted is a device loop
    seq = jnp.minimum((ends[None, :] <= b[:, None]).sum(axis=1), slots - 1).astype(jnp.int32)
    first = cu_q_lens[seq] + (b - (ends[seq] - (q_lens[seq] + q_block - 1) // q_block)) * q_block
    count = jnp.where(b < ends[-1], jnp.minimum(q_block, cu_q_lens[seq + 1] - first), 0)
    return seq, first.astype(jnp.int32), count.astype(jnp.int32)


def _merge_splits(o, m, l):
    """Partials o [N, T, kvh, G, D], m and l [N, T, kvh, G] -> float32 [T, kvh, G, D]."""
    m_all = m.max(axis=0)
    m_all = jnp.where(m_all == -jnp.inf, 0.0, m_all)
    w = jnp.where(l > 0, l * jnp.exp(m - m_all[None]), 0.0)  # [N, T, kvh, G]
    total = w.sum(axis=0)
    out = (w[..., None] * jnp.where(w[..., None] > 0, o, 0.0)).sum(axis=0)  # no dot: XLA GPU dots may be tf32
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def ragged_paged_attention_gpu(q, kv: KVPages, layer, kv_lens, page_tables, cu_q_lens, num_seqs, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, interpret: bool = False,
                               num_kv_splits: int | None = None, q_block: int | None = None,
                               pages_per_block: int | None = None, dot_pieces: int = 3,
                               num_warps: int = 4, num_stages: int = 2):
    """See common.py. Tuning (all static): num_kv_splits (None: fill ~TARGET_PROGRAMS programs),
    q_block tokens per query block (None: 16 rows of tokens x padded group; raise it for long
    prefills), pages_per_block (None: 64-token KV blocks, 32 for 4-bit pages), dot_pieces (bf16
    pieces of the query and probabilities: 3 float32-exact, 1 plain bf16), Triton's warps and
    pipeline stages. Compiled, q_block x padded group and the KV block must be >= 16 (Triton dots)."""
    fmt = kv.format
    t, h, d = q.shape
    kvh, page_size = kv.k.shape[3], kv.page_size
    g, gp = h // kvh, _pow2(h // kvh)
    q_block = q_block or max(1, 16 // gp)
    # 4-bit blocks unpack into twice the registers: half as many tokens per block
    pages_per_block = pages_per_block or max(1, (32 if fmt.packed else 64) // page_size)
    for name, n in (("q_block", q_block), ("pages_per_block", pages_per_block), ("head_dim", d)):
        if n != _pow2(n):
            raise ValueError(f"{name} must be a power of two, got {n}")
    if not interpret and min(q_block * gp, pages_per_block * page_size) < 16:
        raise ValueError("Triton dots need q_block x group and pages_per_block x page_size >= 16")
    slots, max_pages = page_tables.shape
    num_blocks = min(t, -(-(t + slots * (q_block - 1)) // q_block))
    max_kv_blocks = -(-max_pages // pages_per_block)
    splits = num_kv_splits or default_num_kv_splits(min(slots, t), kvh, max_kv_blocks)

    qg = fold_query(q, kv, layer, sm_scale)  # [T, kvh, G, D] float32
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    qg = jnp.stack([qg] if fmt.name == "float32" else split_bf16(qg, dot_pieces))  # [pieces, T, kvh, Gp, D]
    n_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(-1)[0]
    cu = jnp.asarray(cu_q_lens, jnp.int32)
    seq, first, count = _query_blocks(cu, n_seqs, q_block, num_blocks)
    meta = jnp.asarray(layer, jnp.int32).reshape(1)
    args = [meta, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(page_tables, jnp.int32), cu, seq, first,
            count, qg, kv.k, kv.v] + ([kv.k_scale, kv.v_scale] if fmt.packed else [])
    kernel = functools.partial(
        _kernel, fmt=fmt, q_block=q_block, group=gp, pages_per_block=pages_per_block, num_splits=splits,
        sliding_window=sliding_window, soft_cap=soft_cap, pieces=dot_pieces)
    part = (splits, t + 1, kvh, gp)  # one extra token row: the trash row of padding block rows
    o, m, l = pl.pallas_call(
        kernel, grid=(num_blocks, kvh, splits),
        out_shape=[jax.ShapeDtypeStruct(part + (d,), jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name=f"rpa_gpu_{fmt.name}",
    )(*args)
    out = _merge_splits(o[:, :t, :, :g], m[:, :t, :, :g], l[:, :t, :, :g])
    valid = jnp.arange(t) < cu[n_seqs]  # padding tokens were never written: zero them
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return unfold_output(out, kv, layer, q.dtype)
