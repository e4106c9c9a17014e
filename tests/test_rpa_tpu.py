"""The Mosaic TPU ragged paged attention kernel, interpreted on CPU with the race detector on,
against the pure-JAX reference. Interpretation is slow, so the cases form a covering set rather
than a product: every KV format, every batch shape, page sizes 16 and 32, head dims 64 and 128,
GQA ratios 1, 3 and 8, sliding window and soft cap, empty sequences, tuning variants, and a
traced layer inside jit and scan."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice, AbstractMesh
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_tpu
from rpa_cases import BATCHES, LAYERS, TOLERANCE, make_case

BATCH = {name: (q_lens, kv_lens) for name, q_lens, kv_lens in BATCHES}
SMALL = {"q_block": 8, "pages_per_block": 1}  # small blocks: many grid points and KV blocks per call


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """A kernel that raises leaves the interpreter's shared state behind; clear it for the next test."""
    yield
    pltpu.reset_tpu_interpret_mode_state()


def _interpret():
    return pltpu.InterpretParams(detect_races=True)


def _assert_no_races():
    # The interpreter keeps the race detector of its last kernel in this module global.
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found


def _reference(case, **kwargs):
    """The reference, jitted (ten times faster than eager here) with the lengths as constants."""
    lengths = (case.kv_lens, case.page_tables, case.cu_q_lens, case.num_seqs)
    run = jax.jit(lambda q, kv: ragged_paged_attention_reference(q, kv, case.layer, *lengths, **kwargs))
    return run(case.q, case.kv)


def _check(case, fmt, **kwargs):
    """Runs the kernel on `case` and compares with the reference; kwargs go to both (attention
    options) or only to the kernel (tuning)."""
    tuning = {k: kwargs.pop(k) for k in ("q_block", "pages_per_block", "kv_heads_per_block") if k in kwargs}
    sm_scale = case.q.shape[-1] ** -0.5
    kernel = jax.jit(lambda *args: ragged_paged_attention_tpu(*args, sm_scale=sm_scale, interpret=_interpret(),
                                                              **kwargs, **tuning))
    out = np.asarray(jax.block_until_ready(kernel(*case.args())))
    _assert_no_races()
    want = np.asarray(_reference(case, sm_scale=sm_scale, **kwargs))
    assert out.shape == want.shape and out.dtype == case.q.dtype
    np.testing.assert_allclose(out, want, atol=TOLERANCE[fmt], rtol=TOLERANCE[fmt])
    padding = int(case.cu_q_lens[int(case.num_seqs[0])])
    assert not out[padding:].any(), "padding query rows must be zeros"
    return out


# (fmt, batch, page_size, head_dim, heads, kv_heads, extra kwargs)
CASES = {
    "f32-decode-p16-d64-g3": ("float32", "decode", 16, 64, 6, 2, SMALL),
    "f32-mixed-p16-d64-g8": ("float32", "mixed", 16, 64, 8, 1, SMALL),
    "f32-long-p16-d128-g1": ("float32", "long", 16, 128, 2, 2, {"q_block": 16, "pages_per_block": 2}),
    "bf16-mixed-p32-d64-g1": ("bfloat16", "mixed", 32, 64, 2, 2, SMALL),
    "fp8-prefill-p16-d128-g8": ("fp8", "prefill", 16, 128, 8, 1, SMALL),
    "int8-long-p32-d64-g3": ("int8", "long", 32, 64, 6, 2, {"q_block": 16, "pages_per_block": 2}),
    "int4-mixed-p16-d128-g3": ("int4", "mixed", 16, 128, 6, 2, SMALL),
    "nvfp4-decode-p32-d64-g8": ("nvfp4", "decode", 32, 64, 8, 1, SMALL),
    # Defaults for the tuning knobs, and one kv head per grid point.
    "int8-mixed-defaults": ("int8", "mixed", 16, 64, 6, 2, {}),
    "bf16-prefill-head-blocks": ("bfloat16", "prefill", 32, 64, 6, 2, dict(SMALL, kv_heads_per_block=1)),
    # Sliding window (KV loops that start past block 0) and soft cap.
    "f32-long-window-cap": ("float32", "long", 16, 64, 6, 2, dict(SMALL, sliding_window=24, soft_cap=30.0)),
    "nvfp4-mixed-window-cap": ("nvfp4", "mixed", 16, 64, 6, 2, dict(SMALL, sliding_window=9, soft_cap=20.0)),
    "int4-decode-window": ("int4", "decode", 16, 64, 2, 2, dict(SMALL, sliding_window=16)),
}


QUICK = ("f32-mixed-p16-d64-g8", "int4-mixed-p16-d128-g3")  # pytest -m "not slow" runs these two


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_matches_reference(name):
    fmt, batch, page_size, head_dim, heads, kv_heads, kwargs = CASES[name]
    case = make_case(len(name), fmt, *BATCH[batch], page_size=page_size, head_dim=head_dim, heads=heads,
                     kv_heads=kv_heads)
    _check(case, fmt, **kwargs)


def test_sequences_without_query_tokens():
    """Sequences with cached tokens but no query tokens this step (cu_q_lens equal), in the middle
    and at the end of the batch, contribute no rows and do not disturb their neighbours."""
    case = make_case(1, "float32", [3, 0, 1, 5, 0], [20, 17, 33, 5, 32], pad_tokens=5)
    _check(case, "float32", **SMALL)


def test_unused_page_slots_are_never_mixed_in():
    """Poison everything outside the sequences' tokens (unused pages, the null page, the tail of each
    last page) with NaN: the kernel may read a last page's tail but must never let it through."""
    case = make_case(2, "float32", *BATCH["mixed"], page_size=16)
    k, v = np.array(case.kv.k), np.array(case.kv.v)
    valid = np.zeros(k.shape[1:3], bool)  # [num_pages, page_size]
    for s, n in enumerate(case.kv_lens[: int(case.num_seqs[0])]):
        for i in range(n):
            valid[case.page_tables[s, i // 16], i % 16] = True
    k[:, ~valid], v[:, ~valid] = np.nan, np.nan
    case.kv = case.kv.replace(k=jnp.asarray(k), v=jnp.asarray(v))
    out = _check(case, "float32", **SMALL)
    assert np.isfinite(out).all()


def test_traced_layer_inside_jit_and_scan():
    """As the engine calls it: inside jit and lax.scan over layers, `layer` a traced int32 scalar,
    num_seqs of shape [], bfloat16 queries."""
    fmt = "int4"
    case = make_case(3, fmt, *BATCH["mixed"], page_size=16, head_dim=64)
    q = case.q.astype(jnp.bfloat16)
    sm_scale = 0.125

    @jax.jit
    def all_layers(q, kv, kv_lens, page_tables, cu_q_lens, num_seqs):
        def body(carry, layer):
            out = ragged_paged_attention_tpu(q, kv, layer, kv_lens, page_tables, cu_q_lens, num_seqs,
                                             sm_scale=sm_scale, interpret=_interpret(), **SMALL)
            return carry, out

        return jax.lax.scan(body, 0, jnp.arange(LAYERS, dtype=jnp.int32))[1]

    num_seqs = jnp.asarray(case.num_seqs[0])  # shape []
    outs = jax.block_until_ready(all_layers(q, case.kv, case.kv_lens, case.page_tables, case.cu_q_lens, num_seqs))
    _assert_no_races()
    assert outs.dtype == jnp.bfloat16
    for layer in range(LAYERS):
        want = _reference(dataclasses.replace(case, q=q, layer=layer), sm_scale=sm_scale)
        # Both round float32 results to bfloat16: they may differ by one bfloat16 step.
        np.testing.assert_allclose(np.asarray(outs[layer], np.float32), np.asarray(want, np.float32),
                                   atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "fp8", "int8", "int4", "nvfp4"])
def test_lowers_to_mosaic(fmt):
    """Interpretation skips Mosaic lowering, so also lower (not compile: that needs a TPU) for a
    TPU v6e described by an abstract mesh: every primitive the kernel uses has a Mosaic rule."""
    case = make_case(4, fmt, *BATCH["mixed"], page_size=32, head_dim=128, heads=8, kv_heads=2)
    tpu = AbstractDevice(device_kind="TPU v6 lite", num_cores=1, platform="tpu")
    kernel = jax.jit(lambda *args: ragged_paged_attention_tpu(*args, sm_scale=0.1, sliding_window=64, soft_cap=30.0))
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=tpu)):
        text = kernel.trace(*case.args()).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
