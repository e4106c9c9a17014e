"""Ragged paged attention: one flat batch of query tokens from many sequences over a paged KV cache.

This is the XLA implementation: the CPU production path and the reference the Pallas kernels are
tested against. It streams each sequence's pages in blocks of `pages_per_block` pages with an online
softmax, and loops only as far as the longest sequence in the batch, so it reads the pages sequences
use rather than the whole cache.

Shapes:
    q            [tokens, heads, head_dim]
    k/v cache    [layers, num_pages, page_size, kv_heads, head_dim]; `layer` picks one. Pages are
                 gathered straight from the whole-model cache so no layer slice is ever copied.
    kv_lens      [seqs]       tokens in each sequence's cache, this step's included
    page_tables  [seqs, max_pages]
    cu_q_lens    [seqs + 1]   query tokens of sequence s are cu_q_lens[s]:cu_q_lens[s + 1]
    num_seqs     []           sequences in use (the rest is padding)
Query tokens are the last tokens of their sequence: token i of sequence s sits at position
kv_lens[s] - q_len[s] + i, and sees keys at positions <= its own.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens: int):
    """Per query token: its sequence index (num_seqs-padded tokens get -1) and its position."""
    token = jnp.arange(num_tokens)
    seq = jnp.searchsorted(cu_q_lens, token, side="right") - 1  # [tokens]
    valid = (seq < num_seqs) & (token < cu_q_lens[num_seqs])
    seq = jnp.where(valid, seq, 0)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    position = kv_lens[seq] - q_len + (token - cu_q_lens[seq])
    return jnp.where(valid, seq, -1), jnp.where(valid, position, -1)


def ragged_paged_attention(q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, pages_per_block: int = 8):
    tokens, heads, head_dim = q.shape
    page_size, kv_heads = k_cache.shape[2], k_cache.shape[3]
    group = heads // kv_heads
    block = pages_per_block * page_size
    seq, position = token_layout(kv_lens, cu_q_lens, num_seqs, tokens)
    # Each token reads its own sequence's page table; pad the table to whole blocks with the null page.
    max_pages = page_tables.shape[1]
    padded_pages = -(-max_pages // pages_per_block) * pages_per_block
    tables = jnp.pad(page_tables, ((0, 0), (0, padded_pages - max_pages)))[jnp.maximum(seq, 0)]
    qg = (q.astype(jnp.float32) * sm_scale).reshape(tokens, kv_heads, group, head_dim)
    longest = jnp.max(jnp.where(jnp.arange(kv_lens.shape[0]) < num_seqs, kv_lens, 0))
    num_blocks = (longest + block - 1) // block

    def attend_block(j, carry):
        m, l, acc = carry  # running max [T, kvh, g], normalizer [T, kvh, g], output [T, kvh, g, hd]
        pages = jax.lax.dynamic_slice_in_dim(tables, j * pages_per_block, pages_per_block, axis=1)
        k = k_cache[layer, pages].reshape(tokens, block, kv_heads, head_dim).astype(jnp.float32)
        v = v_cache[layer, pages].reshape(tokens, block, kv_heads, head_dim).astype(jnp.float32)
        s = jnp.einsum("tkgd,tskd->tkgs", qg, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        key_pos = j * block + jnp.arange(block)
        visible = key_pos[None, :] <= position[:, None]  # [T, block]; also excludes padding (-1)
        if sliding_window is not None:
            visible &= key_pos[None, :] > position[:, None] - sliding_window
        s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        safe_m = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - safe_m[..., None])
        correction = jnp.exp(jnp.where(jnp.isfinite(m), m - safe_m, -jnp.inf))
        l = l * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("tkgs,tskd->tkgd", p, v)
        return m_new, l, acc

    init = (jnp.full((tokens, kv_heads, group), -jnp.inf, jnp.float32),
            jnp.zeros((tokens, kv_heads, group), jnp.float32),
            jnp.zeros((tokens, kv_heads, group, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_blocks, attend_block, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # padding tokens attend to nothing: zeros
    return out.reshape(tokens, heads, head_dim).astype(q.dtype)


def write_kv(k_cache, v_cache, layer, k, v, slot_mapping):
    """Scatters new k, v [tokens, kv_heads, head_dim] of `layer` into slots (page * page_size + offset),
    in place under a donated jit."""
    page_size = k_cache.shape[2]
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    k_cache = k_cache.at[layer, page, offset].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[layer, page, offset].set(v.astype(v_cache.dtype))
    return k_cache, v_cache
