"""The pure-JAX reference for ragged paged attention: one sequence at a time, every page of it
dequantized, a plain masked softmax. Obviously right and slow; it needs concrete (not traced)
lengths. The kernels and the XLA path are tested against it."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_quant import KVPages, dequantize
from pallas_kernels.ragged_paged_attention.common import fold_query, unfold_output


def ragged_paged_attention_reference(q, kv: KVPages, layer, kv_lens, page_tables, cu_q_lens, num_seqs, *,
                                     sm_scale: float, sliding_window: int | None = None,
                                     soft_cap: float | None = None):
    fmt = kv.format
    qg = fold_query(q, kv, layer, sm_scale)  # [T, kvh, g, D]
    out = jnp.zeros_like(qg)
    kv_lens, page_tables, cu = (np.asarray(a) for a in (kv_lens, page_tables, cu_q_lens))
    ps = kv.page_size
    for s in range(int(np.asarray(num_seqs).reshape(-1)[0])):
        n_kv, q0, q1 = int(kv_lens[s]), int(cu[s]), int(cu[s + 1])
        if q1 == q0:
            continue
        pages = page_tables[s, : -(-n_kv // ps)]

        def gather(codes, scales):  # -> [n_kv, kvh, D] float32 (channel scale still folded out)
            c = codes[layer, pages].reshape((-1,) + codes.shape[3:])[:n_kv]
            sc = None if scales is None else scales[layer, pages].reshape((-1,) + scales.shape[3:])[:n_kv]
            return dequantize(c, sc, fmt)

        k, v = gather(kv.k, kv.k_scale), gather(kv.v, kv.v_scale)
        scores = jnp.einsum("tkgd,skd->tkgs", qg[q0:q1], k)
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        q_pos = n_kv - (q1 - q0) + np.arange(q1 - q0)
        k_pos = np.arange(n_kv)
        visible = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
        scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
        probs = jnp.exp(scores - scores.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
        out = out.at[q0:q1].set(jnp.einsum("tkgs,skd->tkgd", probs, v))
    return unfold_output(out, kv, layer, q.dtype)
