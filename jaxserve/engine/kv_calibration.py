"""Channel scales for quantized KV pages, computed from data when the engine starts.

The model runs once over a fixed calibration text (the opening of the US Constitution, public
domain, in jaxserve/data/) with float32 pages; the largest |key| and |value| seen per (layer, kv
head, channel), in the rotated basis the pages use, becomes that channel's scale (pallas_kernels/kv_quant.py). The text is fixed, so a
model gets the same scales on every start and outputs stay reproducible across restarts.
"""
from __future__ import annotations

import importlib.resources
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.checkpoint import LoadedModel
from jaxserve.models import AttentionMetadata, empty_kv_pages, forward
from pallas_kernels.kv_quant import FORMATS, KVFormat, channel_scales, rotate

log = logging.getLogger(__name__)
MAX_CALIBRATION_TOKENS = 512
_PAGE = 16


def calibration_tokens(model: LoadedModel) -> list[int]:
    text = (importlib.resources.files("jaxserve") / "data" / "kv_calibration.txt").read_text()
    if model.tokenizer is not None:
        ids = model.tokenizer.encode_chat([{"role": "user", "content": text}])
    else:  # a checkpoint without a tokenizer: a fixed spread of token ids
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, MAX_CALIBRATION_TOKENS).tolist()
    return list(ids)[:MAX_CALIBRATION_TOKENS]


def _calibration_pass(graphdef, fmt: KVFormat, heads, params, kv, tokens, meta):
    _, kv = forward(graphdef, params, kv, tokens, jnp.arange(tokens.shape[0], dtype=jnp.int32), meta, "xla", heads)
    # Pages of a quantized format hold rotated values, so the scales are of rotated values too.
    return (jnp.abs(rotate(kv.k, fmt)).max(axis=(1, 2)),
            jnp.abs(rotate(kv.v, fmt)).max(axis=(1, 2)))  # [layers, kv_heads, head_dim]


def calibrate(model: LoadedModel, fmt: KVFormat, heads=None):
    """-> (k_chan, v_chan) float32 [layers, kv_heads, head_dim] channel scales for `fmt`.
    heads: how attention splits over the model's mesh (jaxserve.parallel.head_parallel), or None."""
    ids = calibration_tokens(model)
    n = len(ids)
    pages = -(-n // _PAGE)
    table = np.arange(1, pages + 1, dtype=np.int32)
    positions = np.arange(n)
    meta = AttentionMetadata(
        slot_mapping=jnp.asarray(table[positions // _PAGE] * _PAGE + positions % _PAGE, jnp.int32),
        kv_lens=jnp.asarray([n], jnp.int32), page_tables=jnp.asarray(table[None]),
        cu_q_lens=jnp.asarray([0, n], jnp.int32), num_seqs=jnp.asarray(1, jnp.int32))
    kv = empty_kv_pages(model.config, FORMATS["float32"], pages + 1, _PAGE)
    k_max, v_max = jax.jit(_calibration_pass, static_argnums=(0, 1, 2))(
        model.graphdef, fmt, heads, model.params, kv, jnp.asarray(ids, jnp.int32), meta)
    log.info("KV %s channel scales calibrated on %d tokens (|k| max %.1f, |v| max %.1f)",
             fmt.name, n, float(k_max.max()), float(v_max.max()))
    return channel_scales(k_max, fmt), channel_scales(v_max, fmt)
