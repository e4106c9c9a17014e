"""The Pallas GPU ragged paged attention kernel against the pure-JAX reference. On a CPU the kernel
runs in Pallas' interpreter; where jax sees a GPU the same cases run compiled (Triton). Every call
goes through jax.jit with `layer` and the metadata traced, as the engine calls it."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kv_quant import FORMATS
from pallas_kernels.ragged_paged_attention.gpu import (
    _query_blocks,
    ragged_paged_attention_gpu,
)
from pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_reference,
)
from tests.rpa_cases import BATCHES, TOLERANCE, make_case

INTERPRET = jax.default_backend() != "gpu"
SM_SCALE = 0.125
BATCH = {name: (q_lens, kv_lens) for name, q_lens, kv_lens in BATCHES}
BATCH["holes"] = ([2, 0, 1, 0], [20, 15, 1, 0])  # a scheduled-nothing slot between real ones
BATCH["edges32"] = ([1, 1, 1, 3], [32, 33, 64, 65])  # page size 32: on and just past boundaries


@functools.cache
def _kernel(**static):
    return jax.jit(functools.partial(ragged_paged_attention_gpu, sm_scale=SM_SCALE, interpret=INTERPRET, **static))


def _reference(c, **mask):
    """The reference, jitted over the arrays with the lengths baked in (far faster than eager), with
    float32 dots (on a GPU XLA's default precision is tf32)."""
    f = functools.partial(ragged_paged_attention_reference, layer=c.layer, kv_lens=c.kv_lens, page_tables=c.page_tables,
                          cu_q_lens=c.cu_q_lens, num_seqs=c.num_seqs, sm_scale=SM_SCALE, **mask)
    with jax.default_matmul_precision("highest"):
        return jax.jit(lambda q, kv: f(q, kv))(c.q, c.kv)


def _check(fmt, batch, *, seed=0, case_kw=None, num_seqs_scalar=False, **static):
    q_lens, kv_lens = BATCH[batch]
    c = make_case(seed, fmt, q_lens, kv_lens, **(case_kw or {}))
    mask = {k: static[k] for k in ("sliding_window", "soft_cap") if k in static}
    n = c.num_seqs.reshape(()) if num_seqs_scalar else c.num_seqs
    out = _kernel(**static)(c.q, c.kv, jnp.int32(c.layer), c.kv_lens, c.page_tables, c.cu_q_lens, n)
    ref = _reference(c, **mask)
    assert out.shape == c.q.shape and out.dtype == c.q.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOLERANCE[fmt], rtol=TOLERANCE[fmt])
    return out, c


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_mixed_batch(fmt):
    _check(fmt, "mixed", num_kv_splits=2)


@pytest.mark.slow  # pytest -m "not slow": every format's mixed batch covers the kernel
@pytest.mark.parametrize("batch", ["decode", "prefill", "long", "holes"])
def test_batches(batch):
    out, c = _check("bfloat16", batch, num_kv_splits=3)
    assert not np.asarray(out[int(c.cu_q_lens[-1]):]).any()  # padding tokens give zeros


@pytest.mark.slow
@pytest.mark.parametrize("fmt,case_kw", [
    ("nvfp4", {"page_size": 32, "head_dim": 128, "heads": 16, "kv_heads": 2}),  # GQA 8, D 128
    ("int4", {"page_size": 32, "head_dim": 128, "heads": 2, "kv_heads": 2}),    # no GQA
    ("int8", {"page_size": 32, "head_dim": 64, "heads": 6, "kv_heads": 2}),     # GQA 3
])
def test_page_size_head_dim_group(fmt, case_kw):
    _check(fmt, "edges32", case_kw=case_kw)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,batch,window,cap", [
    ("bfloat16", "long", 20, None), ("fp8", "mixed", 7, 20.0), ("int4", "decode", None, 5.0),
])
def test_sliding_window_and_soft_cap(fmt, batch, window, cap):
    _check(fmt, batch, sliding_window=window, soft_cap=cap, num_kv_splits=2)


@pytest.mark.slow
@pytest.mark.parametrize("static", [
    {"num_kv_splits": 1}, {"num_kv_splits": 8, "pages_per_block": 1},
    {"q_block": 16, "pages_per_block": 2}, {},  # default splits and blocks
])
def test_tuning(static):
    _check("float32", "long", case_kw={"heads": 16, "kv_heads": 2}, num_seqs_scalar=True, **static)


@pytest.mark.slow
def test_plain_bf16_dots_close():
    """`dot_pieces=1` rounds the query and probabilities to bfloat16: close, not exact."""
    q_lens, kv_lens = BATCH["mixed"]
    c = make_case(1, "int8", q_lens, kv_lens)
    out = _kernel(dot_pieces=1)(*c.args())
    ref = _reference(c)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=3e-2, rtol=3e-2)


def test_query_blocks():
    cu = jnp.asarray([0, 5, 5, 6, 6, 6], jnp.int32)  # q_lens 5, 0, 1, then 2 padding slots
    seq, first, count = _query_blocks(cu, jnp.int32(3), q_block=4, num_blocks=5)
    assert np.asarray(seq)[:3].tolist() == [0, 0, 2]
    assert np.asarray(first)[:3].tolist() == [0, 4, 5]
    assert np.asarray(count).tolist() == [4, 1, 1, 0, 0]
