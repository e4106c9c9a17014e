"""KV page formats: round-trip error per format, the XLA attention path against the reference on
quantized pages, and page accounting by real bytes."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kv_quant import (FORMATS, bytes_per_page, channel_scales, decode_scales, dequantize, kv_format, quantize,
                                     rotate)
from rpa_cases import TOLERANCE, batch_params, make_case, reference, xla_path

# Relative RMS error of quantize -> dequantize on keys with uneven channels (see _keys).
# int8 keeps headroom above the calibrated max (INT8_HEADROOM), so its steps are 1.5x a tight fit.
MAX_RMS_ERROR = {"float32": 0.0, "bfloat16": 4e-3, "fp8": 0.04, "int8": 0.015, "int4": 0.12, "nvfp4": 0.12}


def _keys(seed=0, tokens=200, heads=3, head_dim=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, heads, head_dim)) * rng.uniform(0.1, 8.0, head_dim)
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_error(name):
    fmt, x = FORMATS[name], _keys()
    chan = channel_scales(jnp.abs(rotate(x, fmt)).max(0), fmt) if fmt.quantized else None
    codes, scales = quantize(x, chan, fmt)
    y = rotate(dequantize(codes, scales, fmt) * (1.0 if chan is None else chan), fmt)
    rms = float(jnp.sqrt(jnp.mean((y - x) ** 2) / jnp.mean(x ** 2)))
    assert rms <= MAX_RMS_ERROR[name]
    if name != "float32":
        assert rms > 0  # it really is quantized
    # Values beyond the calibrated range saturate instead of overflowing.
    big = rotate(dequantize(*quantize(x * 3, chan, fmt), fmt) * (1.0 if chan is None else chan), fmt)
    assert bool(jnp.isfinite(big).all())


def test_scales_come_from_the_data():
    fmt = FORMATS["nvfp4"]
    x = _keys()
    chan = channel_scales(jnp.abs(rotate(x, fmt)).max(0), fmt)
    _, scales = quantize(x, chan, fmt)
    assert len(np.unique(np.asarray(decode_scales(scales, fmt)))) > 8  # per block (e4m3 values), not a fixed 1.0
    assert len(np.unique(np.asarray(chan))) > 100


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("batch", batch_params())
def test_xla_path_matches_reference(name, batch):
    _, q_lens, kv_lens = batch
    case = make_case(1, name, q_lens, kv_lens)
    want = reference(case, sm_scale=0.125)
    got = xla_path(case, sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOLERANCE[name], rtol=TOLERANCE[name])


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in ("fp8", "int8", "nvfp4")] + ["int4"])
def test_key_centers_remove_a_shared_offset(name):
    """Keys sharing a large offset (as real keys do): pages storing keys minus their median give
    attention as close to float32 as if the offset were not there (it moves every score of a query
    by one constant, which softmax ignores), and much closer than plain pages; the XLA path still
    matches the reference on them. Measured RMS error ratios centered/plain: fp8 0.36, int8 0.64,
    int4 0.55, nvfp4 0.38."""
    batch = dict(q_lens=[1, 9, 1, 33, 1], kv_lens=[31, 40, 32, 33, 1])

    def error(case, offset):
        exact = reference(make_case(3, "float32", key_offset=offset, **batch), sm_scale=0.125)
        return float(jnp.sqrt(jnp.mean((reference(case, sm_scale=0.125) - exact) ** 2)))

    centered = make_case(3, name, key_offset=8.0, center_keys=True, **batch)
    plain = make_case(3, name, key_offset=8.0, **batch)
    no_offset = make_case(3, name, key_offset=0.0, center_keys=True, **batch)
    assert error(centered, 8.0) < 0.7 * error(plain, 8.0)
    assert error(centered, 8.0) == pytest.approx(error(no_offset, 0.0), rel=0.02)
    got = xla_path(centered, sm_scale=0.125)
    want = reference(centered, sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOLERANCE[name], rtol=TOLERANCE[name])


@pytest.mark.parametrize("opts", [dict(sliding_window=7), dict(soft_cap=5.0)], ids=["window", "softcap"])
@pytest.mark.parametrize("name", ["int8", pytest.param("nvfp4", marks=pytest.mark.slow)])
def test_xla_path_window_and_soft_cap(name, opts):
    case = make_case(2, name, [1, 20, 1], [40, 20, 17], page_size=32, head_dim=128, heads=8, kv_heads=1)
    want = reference(case, sm_scale=0.1, **opts)
    got = xla_path(case, sm_scale=0.1, **opts)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOLERANCE[name], rtol=TOLERANCE[name])


def test_page_bytes_follow_the_format():
    """SmolLM2-135M shapes, 1 GiB: 8-bit pages hold 2x the tokens of bfloat16, 4-bit ones >= 3.5x."""
    memory, shape = 1 << 30, dict(layers=30, page_size=16, kv_heads=3, head_dim=64)
    tokens = {n: memory // bytes_per_page(f, **shape) * 16 for n, f in FORMATS.items()}
    assert tokens["bfloat16"] == 2 * tokens["float32"]
    for n in ("fp8", "int8"):
        assert tokens[n] >= 2 * tokens["bfloat16"]
    for n in ("int4", "nvfp4"):
        assert tokens[n] >= 3.5 * tokens["bfloat16"]


def test_kv_format_names():
    assert kv_format("auto", jnp.bfloat16).name == "bfloat16"
    assert kv_format("auto", jnp.float32).name == "float32"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        kv_format("fp4")
