"""Random ragged batches over random paged KV caches, in every KV format: the shared test data of
the ragged paged attention implementations (XLA path, TPU kernel, GPU kernel, reference)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_quant import FORMATS, KVPages, channel_scales, quantize, rotate

LAYERS = 2
# Same codes go into every implementation, so they differ only by float32 summation order.
TOLERANCE = {name: 2e-5 for name in FORMATS} | {"bfloat16": 1e-4}


@dataclasses.dataclass
class Case:
    q: jax.Array
    kv: KVPages
    layer: int
    kv_lens: np.ndarray
    page_tables: np.ndarray
    cu_q_lens: np.ndarray
    num_seqs: np.ndarray

    def args(self):
        return (self.q, self.kv, self.layer, self.kv_lens, self.page_tables, self.cu_q_lens, self.num_seqs)


def make_case(seed: int, fmt: str, q_lens, kv_lens, *, page_size=16, head_dim=64, heads=6, kv_heads=2,
              pad_seqs=2, pad_tokens=3, max_pages=None, layer=1, key_offset=0.0, center_keys=False) -> Case:
    """q_lens[i] query tokens at the end of sequence i of kv_lens[i] tokens (q_len <= kv_len).
    Pages are a random permutation (page 0 stays the null page); `pad_seqs` unused sequence rows
    and `pad_tokens` padding query tokens follow the real ones. key_offset: every key gets the same
    random vector of this scale added (as real keys share a large offset); center_keys: quantized
    pages store keys minus their median (kv_quant's k_center)."""
    rng = np.random.default_rng(seed)
    f = FORMATS[fmt]
    q_lens, kv_lens = list(q_lens), list(kv_lens)
    need = [-(-n // page_size) for n in kv_lens]
    max_pages = max_pages or max(need + [1]) + 1
    num_pages = sum(need) + 1 + 3
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(kv_lens) + pad_seqs, max_pages), np.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at:at + n]
        at += n
    shape = (LAYERS, num_pages, page_size, kv_heads, head_dim)
    # Keys with a few large channels (as real keys have), values plainer.
    k = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.2, 4.0, head_dim).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    t = sum(q_lens) + pad_tokens
    q = jnp.asarray(rng.standard_normal((t, heads, head_dim)).astype(np.float32))
    k = k + key_offset * rng.standard_normal((LAYERS, 1, 1, kv_heads, head_dim)).astype(np.float32)
    kv = _quantize_pages(jnp.asarray(k), jnp.asarray(v), f, center_keys)
    cu = np.zeros(len(kv_lens) + pad_seqs + 1, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = cu[len(q_lens)]
    lens = np.zeros(len(kv_lens) + pad_seqs, np.int32)
    lens[:len(kv_lens)] = kv_lens
    return Case(q, kv, layer, lens, tables, cu, np.asarray([len(kv_lens)], np.int32))


def _quantize_pages(k, v, f, center_keys=False) -> KVPages:
    """Quantized pages of k, v [layers, pages, page_size, kv_heads, head_dim], one jitted program per
    format and shape (eager, the many small ops of 4-bit quantization took seconds per case)."""
    return jax.jit(_quantize_pages_traced, static_argnums=(2, 3))(k, v, f, center_keys)


def _quantize_pages_traced(k, v, f, center_keys) -> KVPages:
    if not f.quantized:
        return KVPages(quantize(k, None, f)[0], quantize(v, None, f)[0], format=f)
    zero = jnp.zeros((k.shape[0],) + k.shape[3:], jnp.float32)  # [layers, kv_heads, head_dim]
    k_center = jnp.median(rotate(k, f), axis=(1, 2)) if center_keys else zero
    k_chan = channel_scales(jnp.abs(rotate(k, f) - k_center[:, None, None]).max(axis=(1, 2)), f)
    v_chan = channel_scales(jnp.abs(rotate(v, f)).max(axis=(1, 2)), f)

    def per_layer(x, chan, center):
        lead = x.shape[1:3]
        parts = [quantize(x[l].reshape((-1,) + x.shape[3:]), chan[l], f, center[l]) for l in range(x.shape[0])]
        codes = jnp.stack([c.reshape(lead + c.shape[1:]) for c, _ in parts])
        scales = None if parts[0][1] is None else jnp.stack([s.reshape(lead + s.shape[1:]) for _, s in parts])
        return codes, scales

    (kc, ks), (vc, vs) = per_layer(k, k_chan, k_center), per_layer(v, v_chan, zero)
    return KVPages(kc, vc, ks, vs, k_chan, v_chan, k_center if center_keys else None, format=f)


# Batches every implementation is tested on: (name, q_lens, kv_lens).
BATCHES = [
    ("decode", [1, 1, 1, 1], [1, 16, 17, 40]),            # ends on / just past page boundaries
    ("prefill", [16, 17, 5], [16, 17, 5]),
    ("mixed", [1, 9, 1, 33, 1], [31, 40, 32, 33, 1]),   # prefill chunks after cached prefixes
    ("long", [1, 70], [100, 70]),
]


def reference(case: Case, **kwargs):
    """The pure-JAX reference on `case`, jitted with the lengths as constants (eager, its many small
    ops each compile on first use: ten times slower)."""
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

    lengths = (case.kv_lens, case.page_tables, case.cu_q_lens, case.num_seqs)
    return jax.jit(lambda q, kv: ragged_paged_attention_reference(q, kv, case.layer, *lengths, **kwargs))(case.q, case.kv)


def xla_path(case: Case, **kwargs):
    """The XLA path (jaxserve.ops.attention) on `case`, jitted as the engine runs it."""
    from jaxserve.ops.attention import ragged_paged_attention_xla

    static = tuple(kwargs)
    return jax.jit(ragged_paged_attention_xla, static_argnames=static)(*case.args(), **kwargs)


def batch_params(quick=("mixed",)):
    """BATCHES as pytest params; those not in `quick` are marked slow (pytest -m "not slow" runs fewer)."""
    import pytest

    return [pytest.param(b, id=b[0], marks=() if b[0] in quick else pytest.mark.slow) for b in BATCHES]
