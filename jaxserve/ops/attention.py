"""Ragged paged attention: one flat batch of query tokens from many sequences over a paged KV cache.

This is the XLA implementation: the CPU production path and the reference the Pallas kernels are
tested against. It reads only the pages sequences use, in blocks of `pages_per_block` pages, with
an online softmax, and splits the work two ways because their shapes differ:
  * single-token queries (decodes): blocks of tokens, each token reading its own sequence's pages;
  * multi-token queries (prefill chunks): tiles of `q_tile` tokens of one sequence, so a tile reads
    each KV block once and attends with real matrix products.
Both loops run only as far as the batch needs (dynamic trip counts), so shapes stay static.

The contract (shapes, masking) is pallas_kernels/ragged_paged_attention/common.py. Pages are
gathered straight from the whole-model cache (`layer` picks one), so no layer slice is ever copied,
and quantized pages are dequantized a block at a time inside the loops, never as a whole.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxserve.ops import native
from pallas_kernels.kv_quant import KVPages, dequantize, dequantize_halves, quantize
from pallas_kernels.ragged_paged_attention.common import fold_query, unfold_output

DECODE_BLOCK = 16  # single-token queries handled together
DECODE_PAGES_PER_BLOCK = 2  # decodes gather per token: short blocks waste fewer slots past kv_len


@dataclasses.dataclass(frozen=True)
class _Spec:
    sliding_window: int | None
    soft_cap: float | None
    pages_per_block: int
    page_size: int

    @property
    def block(self) -> int:
        return self.pages_per_block * self.page_size


def _visible(spec: _Spec, q_pos, key_pos):
    """[Tq, Tk] causal (and sliding-window) visibility; q_pos [Tq] is -1 for padding rows."""
    visible = key_pos[None, :] <= q_pos[:, None]
    if spec.sliding_window is not None:
        visible &= key_pos[None, :] > q_pos[:, None] - spec.sliding_window
    return visible


def _cap(spec: _Spec, s):
    return s if spec.soft_cap is None else spec.soft_cap * jnp.tanh(s / spec.soft_cap)


def _scores(qs, ks, qk_eq: str):
    """q.k summed over the channel parts (see _kv_block): qs, ks tuples of matching parts."""
    return functools.reduce(jnp.add, (jnp.einsum(qk_eq, q, k) for q, k in zip(qs, ks)))


def _online_update(carry, s, vs, pv_eq: str):
    """One step of the streaming softmax: carry (max, normalizer, acc parts), scores s [..., Tk]."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    safe_m = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - safe_m[..., None])
    correction = jnp.exp(jnp.where(jnp.isfinite(m), m - safe_m, -jnp.inf))
    acc = tuple(a * correction[..., None] + jnp.einsum(pv_eq, p, v) for a, v in zip(acc, vs))
    return m_new, l * correction + p.sum(-1), acc


def _finish(l, acc):
    """Normalized output, the channel parts joined again; rows that see nothing (padding) give zeros."""
    acc = acc[0] if len(acc) == 1 else jnp.concatenate(acc, axis=-1)
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


def _split(x, parts: int):
    """x [..., D] -> `parts` tuple of [..., D / parts]: the channel parts _kv_block returns."""
    return (x,) if parts == 1 else tuple(jnp.split(x, parts, axis=-1))


def _parts(kv: KVPages) -> int:
    """Channel parts _kv_block returns: 4-bit pages come as the two halves their bytes pack."""
    return 2 if kv.format.packed else 1


def _kv_block(kv: KVPages, layer, pages, spec: _Spec):
    """pages [..., pages_per_block] -> k, v as tuples of _parts(kv) channel parts, float32
    [..., block, kv_heads, head_dim / parts] (channel scale still folded out). Pages are gathered as
    whole rows of a [layers * pages, page_bytes] view: a plain row gather is about twice as fast on
    CPU as indexing the 5-D cache."""
    layers, num_pages = kv.k.shape[:2]
    rows = layer * num_pages + pages
    fmt = kv.format

    def gather(a):
        return None if a is None else a.reshape(layers * num_pages, -1)[rows].reshape(
            pages.shape[:-1] + (spec.block,) + a.shape[3:])

    if fmt.packed:
        return (dequantize_halves(gather(kv.k), gather(kv.k_scale), fmt),
                dequantize_halves(gather(kv.v), gather(kv.v_scale), fmt))
    return (dequantize(gather(kv.k), None, fmt),), (dequantize(gather(kv.v), None, fmt),)


def _decode_part(qg, kv, layer, tables, position, token_ids, count, spec: _Spec):
    """Single-token queries: token_ids [T] lists them first (count of them), padded with T."""
    tokens, kvh, g, hd = qg.shape
    parts = _parts(kv)
    out = jnp.zeros((tokens + 1, kvh, g, hd), jnp.float32)  # row `tokens` absorbs padding writes

    def token_block(b, out):
        idx = jax.lax.dynamic_slice_in_dim(token_ids, b * DECODE_BLOCK, DECODE_BLOCK)  # [TB]
        ok = idx < tokens
        safe = jnp.where(ok, idx, 0)
        q, pos, tab = _split(qg[safe], parts), jnp.where(ok, position[safe], -1), tables[safe]

        def kv_step(j, carry):
            pages = jax.lax.dynamic_slice_in_dim(tab, j * spec.pages_per_block, spec.pages_per_block, axis=1)
            k, v = _kv_block(kv, layer, pages, spec)  # [TB, block, kvh, hd]
            s = _cap(spec, _scores(q, k, "tkgd,tskd->tkgs"))  # [TB, kvh, g, block]
            visible = _visible(spec, pos, j * spec.block + jnp.arange(spec.block))
            s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
            return _online_update(carry, s, v, "tkgs,tskd->tkgd")

        init = (jnp.full((DECODE_BLOCK, kvh, g), -jnp.inf), jnp.zeros((DECODE_BLOCK, kvh, g)),
                _split(jnp.zeros((DECODE_BLOCK, kvh, g, hd)), parts))
        _, l, acc = jax.lax.fori_loop(0, (pos.max() + spec.block) // spec.block, kv_step, init)
        return out.at[jnp.where(ok, idx, tokens)].set(_finish(l, acc))

    return jax.lax.fori_loop(0, (count + DECODE_BLOCK - 1) // DECODE_BLOCK, token_block, out)[:tokens]


def _prefill_part(qg, kv, layer, page_tables, cu_q_lens, kv_lens, seqs, num, out, q_tile, spec):
    """Multi-token queries: `seqs` [S] lists their sequences first (`num` of them)."""
    tokens, kvh, g, hd = qg.shape
    parts = _parts(kv)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    tiles = jnp.where(jnp.arange(seqs.shape[0]) < num, (q_lens[seqs] + q_tile - 1) // q_tile, 0)
    ends = jnp.cumsum(tiles)
    q_pad = jnp.pad(qg, ((0, q_tile), (0, 0), (0, 0), (0, 0)))
    out = jnp.pad(out, ((0, q_tile), (0, 0), (0, 0), (0, 0)))

    def tile(i, out):
        item = jnp.searchsorted(ends, i, side="right")
        s = seqs[item]
        row0 = cu_q_lens[s] + (i - (ends[item] - tiles[item])) * q_tile
        rows = row0 + jnp.arange(q_tile)
        valid = rows < cu_q_lens[s + 1]
        pos = jnp.where(valid, kv_lens[s] - q_lens[s] + rows - cu_q_lens[s], -1)  # [TQ]
        q = _split(jax.lax.dynamic_slice_in_dim(q_pad, row0, q_tile), parts)  # [TQ, kvh, g, hd / parts] each
        table = page_tables[s]

        def kv_step(j, carry):
            pages = jax.lax.dynamic_slice_in_dim(table, j * spec.pages_per_block, spec.pages_per_block)
            k, v = _kv_block(kv, layer, pages, spec)  # [block, kvh, hd]
            s_ = _cap(spec, _scores(q, k, "qkgd,skd->kgqs"))  # [kvh, g, TQ, block]
            s_ = jnp.where(_visible(spec, pos, j * spec.block + jnp.arange(spec.block)), s_, -jnp.inf)
            return _online_update(carry, s_, v, "kgqs,skd->kgqd")

        init = (jnp.full((kvh, g, q_tile), -jnp.inf), jnp.zeros((kvh, g, q_tile)),
                _split(jnp.zeros((kvh, g, q_tile, hd)), parts))
        _, l, acc = jax.lax.fori_loop(0, (pos.max() + spec.block) // spec.block, kv_step, init)
        result = _finish(l, acc).transpose(2, 0, 1, 3)  # [TQ, kvh, g, hd]
        old = jax.lax.dynamic_slice_in_dim(out, row0, q_tile)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(valid[:, None, None, None], result, old), row0, 0)

    return jax.lax.fori_loop(0, ends[-1], tile, out)[:tokens]


def token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens: int):
    """Per query token: its sequence index (padding tokens get -1) and its position (-1 for padding)."""
    token = jnp.arange(num_tokens)
    seq = jnp.searchsorted(cu_q_lens, token, side="right") - 1
    valid = (seq < num_seqs) & (token < cu_q_lens[num_seqs])
    seq = jnp.where(valid, seq, 0)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    position = kv_lens[seq] - q_len + (token - cu_q_lens[seq])
    return jnp.where(valid, seq, -1), jnp.where(valid, position, -1)


class AttentionMetadata(NamedTuple):
    """Where a flat batch of tokens belongs: the contract's ragged metadata (see
    pallas_kernels/ragged_paged_attention/common.py), built by the runner each step."""
    slot_mapping: jax.Array  # [tokens] flat KV slot each new token is written to
    kv_lens: jax.Array       # [seqs]
    page_tables: jax.Array   # [seqs, max_pages]
    cu_q_lens: jax.Array     # [seqs + 1]
    num_seqs: jax.Array      # []


class AttentionPlan(NamedTuple):
    """Who attends to what this step. It depends only on the batch layout, so the model builds it
    once per step and every layer reuses it."""
    kv_lens: jax.Array       # [seqs]
    cu_q_lens: jax.Array     # [seqs + 1]
    page_tables: jax.Array   # [seqs, padded pages]  padded with the null page to whole blocks
    token_tables: jax.Array  # [tokens, padded pages] each token's sequence's table
    position: jax.Array      # [tokens] -1 for padding
    decode_ids: jax.Array    # [tokens + DECODE_BLOCK] single-token queries first, padded with `tokens`
    num_decode: jax.Array    # []
    prefill_seqs: jax.Array  # [seqs] sequences with multi-token queries first
    num_prefill: jax.Array   # []


def plan_attention(kv_lens, page_tables, cu_q_lens, num_seqs, num_tokens: int, pages_per_block: int = 8):
    max_pages = page_tables.shape[1]
    padded = -(-max_pages // pages_per_block) * pages_per_block + pages_per_block  # slices never clamp
    page_tables = jnp.pad(page_tables, ((0, 0), (0, padded - max_pages)))
    seq, position = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    in_use = jnp.arange(kv_lens.shape[0]) < num_seqs
    single = in_use & (cu_q_lens[1:] - cu_q_lens[:-1] == 1)
    decode_token = (seq >= 0) & single[jnp.maximum(seq, 0)]
    multi = in_use & ~single
    return AttentionPlan(
        kv_lens, cu_q_lens, page_tables, page_tables[jnp.maximum(seq, 0)], position,
        jnp.nonzero(decode_token, size=num_tokens + DECODE_BLOCK, fill_value=num_tokens)[0], decode_token.sum(),
        jnp.nonzero(multi, size=multi.shape[0], fill_value=0)[0], multi.sum())


def attend(q, kv: KVPages, layer, plan: AttentionPlan, *, sm_scale: float, sliding_window: int | None = None,
           soft_cap: float | None = None, pages_per_block: int = 8, q_tile: int = 32, native_decode: bool = False):
    """Attention of q [tokens, heads, head_dim] for one layer, given this step's plan. native_decode:
    single-token queries go to the C++ kernel (jaxserve/ops/native), which reads unpacked pages only."""
    spec = _Spec(sliding_window, soft_cap, pages_per_block, kv.page_size)
    qg = fold_query(q, kv, layer, sm_scale)  # [T, kvh, g, hd]
    if native_decode and kv.format.packed:
        raise ValueError(f"the native decode kernel does not read {kv.format.name} pages")
    if native_decode:
        out = native.decode_attention(qg, kv.k, kv.v, layer, plan.token_tables, plan.position, plan.decode_ids,
                                      plan.num_decode, sliding_window=sliding_window, soft_cap=soft_cap)
    else:
        decode_spec = dataclasses.replace(spec, pages_per_block=DECODE_PAGES_PER_BLOCK)
        out = _decode_part(qg, kv, layer, plan.token_tables, plan.position, plan.decode_ids, plan.num_decode,
                           decode_spec)
    out = _prefill_part(qg, kv, layer, plan.page_tables, plan.cu_q_lens, plan.kv_lens,
                        plan.prefill_seqs, plan.num_prefill, out, q_tile, spec)
    return unfold_output(out, kv, layer, q.dtype)


def ragged_paged_attention_xla(q, kv: KVPages, layer, kv_lens, page_tables, cu_q_lens, num_seqs, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, pages_per_block: int = 8, q_tile: int = 32,
                               native_decode: bool = False):
    """The kernel contract: plan and attend in one call."""
    kv_lens, page_tables, cu_q_lens = (jnp.asarray(a, jnp.int32) for a in (kv_lens, page_tables, cu_q_lens))
    plan = plan_attention(kv_lens, page_tables, cu_q_lens, jnp.reshape(num_seqs, ()), q.shape[0], pages_per_block)
    return attend(q, kv, layer, plan, sm_scale=sm_scale, sliding_window=sliding_window,
                  soft_cap=soft_cap, pages_per_block=pages_per_block, q_tile=q_tile, native_decode=native_decode)


def write_kv(kv: KVPages, layer, k, v, slot_mapping) -> KVPages:
    """Quantizes new k, v [tokens, kv_heads, head_dim] of `layer` into the page format and scatters
    them into their slots (page * page_size + offset), in place under a donated jit."""
    page, offset = slot_mapping // kv.page_size, slot_mapping % kv.page_size
    fmt = kv.format
    chan = lambda c: None if c is None else c[layer]  # noqa: E731
    (kc, ks), (vc, vs) = quantize(k, chan(kv.k_chan), fmt, chan(kv.k_center)), quantize(v, chan(kv.v_chan), fmt)
    put = lambda cache, new: None if cache is None else cache.at[layer, page, offset].set(new)  # noqa: E731
    return kv.replace(k=put(kv.k, kc), v=put(kv.v, vc), k_scale=put(kv.k_scale, ks), v_scale=put(kv.v_scale, vs))
