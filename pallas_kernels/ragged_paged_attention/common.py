"""What every implementation of the ragged paged attention contract shares: the rotation and the
channel scales of quantized pages are folded into the query (keys) and the output (values), so
kernels only ever touch codes and block scales.

    q            [tokens, heads, head_dim]
    kv           KVPages (pallas_kernels.kv_quant): whole-model pages; `layer` picks one layer
    kv_lens      [seqs] int32  tokens in each sequence's cache, this step's included
    page_tables  [seqs, max_pages] int32
    cu_q_lens    [seqs + 1] int32  query tokens of sequence s are cu_q_lens[s]:cu_q_lens[s + 1]
    num_seqs     [] or [1] int32  sequences in use (the rest is padding)
Query tokens are the last tokens of their sequence: token i of sequence s sits at position
kv_lens[s] - q_len[s] + i and sees keys at positions <= its own (and > position - sliding_window).
Scores are q.k * sm_scale, then soft_cap * tanh(score / soft_cap) when soft_cap is set. Rows of
padding tokens (past cu_q_lens[num_seqs]) and rows that see no key come out as zeros.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.kv_quant import KVPages, rotate


def fold_query(q, kv: KVPages, layer, sm_scale: float):
    """q [T, H, D] -> float32 [T, kv_heads, group, D]: scaled by sm_scale and, for quantized pages,
    rotated into the pages' basis and multiplied by the key channel scale."""
    t, h, d = q.shape
    kvh = kv.k.shape[3]
    qg = q.astype(jnp.float32).reshape(t, kvh, h // kvh, d) * sm_scale
    if kv.k_chan is not None:
        qg = rotate(qg, kv.format) * kv.k_chan[layer][None, :, None, :]
    return qg


def unfold_output(out, kv: KVPages, layer, dtype):
    """float32 [T, kv_heads, group, D] -> [T, H, D] in dtype; for quantized pages times the value
    channel scale and rotated back."""
    if kv.v_chan is not None:
        out = rotate(out * kv.v_chan[layer][None, :, None, :], kv.format)
    t, kvh, g, d = out.shape
    return out.reshape(t, kvh * g, d).astype(dtype)
