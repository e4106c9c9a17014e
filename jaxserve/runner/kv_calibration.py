"""Channel scales for quantized KV pages, computed from data when the engine starts.

The model runs once over a fixed calibration text (the opening of the US Constitution, public
domain, in jaxserve/data/) with float32 pages. Per (layer, kv head, channel), in the rotated basis
the pages use: the point halfway between the first token's key and the median key becomes the key
center, and the largest |key - center| and |value| become the channel scales
(pallas_kernels/kv_quant.py). The text is fixed, so a model gets the same scales on every start and
outputs stay reproducible across restarts.
"""
from __future__ import annotations

import importlib.resources
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.checkpoint import LoadedModel
from jaxserve.models import AttentionMetadata, empty_kv_pages, forward
from jaxserve.ops.backends import XLA
from pallas_kernels.kv_formats import FORMATS, KVFormat
from pallas_kernels.kv_quant import channel_scales, rotate

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


def _calibration_pass(graphdef, fmt: KVFormat, lmesh, params, kv, tokens, meta):
    """-> key channel scales, value channel scales, key centers [layers, kv_heads, head_dim]."""
    _, kv = forward(graphdef, params, kv, tokens, jnp.arange(tokens.shape[0], dtype=jnp.int32), meta, XLA, lmesh)
    # Pages of a quantized format hold rotated values, so scales and centers are of rotated values.
    n = tokens.shape[0]
    k, v = (rotate(x[:, 1:], fmt).reshape(x.shape[0], -1, *x.shape[3:])[:, :n] for x in (kv.k, kv.v))  # [L, n, H, D]
    # Halfway between the first token's key and the median key. The median alone takes most keys
    # closest to zero, but the first token's key (small, and the attention sink most queries look
    # at) then moves far from it and loses precision; short contexts suffer most. Keys alone in
    # int4, Alice, perplexity vs float32 pages at ctx 2048 / ctx 256 (first 1,020 tokens): no
    # center +5.0% / +3.1%, median +2.6% / +5.5%, first key +4.2% / +1.0%, halfway +3.4% / +2.3%.
    k_center = (k[:, 0] + jnp.median(k, axis=1)) / 2
    return (channel_scales(jnp.abs(k - k_center[:, None]).max(1), fmt),
            channel_scales(jnp.abs(v).max(1), fmt), k_center)


def calibrate(model: LoadedModel, fmt: KVFormat, lmesh=None):
    """-> (k_chan, v_chan, k_center) float32 [layers, kv_heads, head_dim]: the channel scales of
    `fmt` and the key centers (pallas_kernels/kv_quant.py).
    lmesh: the LogicalMesh the model's params live on (jaxserve.parallel.logical_mesh), or None."""
    ids = calibration_tokens(model)
    n = len(ids)
    pages = -(-n // _PAGE)
    table = np.arange(1, pages + 1, dtype=np.int32)  # page 0 is the null page
    positions = np.arange(n)
    meta = AttentionMetadata(
        slot_mapping=jnp.asarray(table[positions // _PAGE] * _PAGE + positions % _PAGE, jnp.int32),
        kv_lens=jnp.asarray([n], jnp.int32), page_tables=jnp.asarray(table[None]),
        cu_q_lens=jnp.asarray([0, n], jnp.int32), num_seqs=jnp.asarray(1, jnp.int32))
    kv = empty_kv_pages(model.config, FORMATS["float32"], pages + 1, _PAGE)
    k_chan, v_chan, k_center = jax.jit(_calibration_pass, static_argnums=(0, 1, 2))(
        model.graphdef, fmt, lmesh, model.params, kv, jnp.asarray(ids, jnp.int32), meta)
    log.info("KV %s channel scales calibrated on %d tokens (|k - center| max %.1f, |v| max %.1f)",
             fmt.name, n, float(k_chan.max() * fmt.chan_max), float(v_chan.max() * fmt.chan_max))
    return k_chan, v_chan, k_center
