"""Quantized KV pages: the page arrays (KVPages, which carry their format), how values are
quantized when written, and how a block of pages is dequantized inside an attention kernel. Pure
jnp, so the XLA path, the Pallas kernels (interpreted or compiled) and the references share one
definition. The formats themselves (names, dtypes, sizes) are plain data in kv_formats.py.

A value x of layer l, kv head h, channel d is stored as

    x ~= decode(code) * block_scale * chan[l, h, d]

  * `chan` [layers, kv_heads, head_dim] float32: a static per-channel scale (KVQuant's per-channel
    keys; values get one too) computed from calibration data when the engine starts. It costs no
    page memory, so 8-bit pages hold exactly twice the tokens of bfloat16 pages. Kernels never
    multiply it into the pages: keys fold it into the query, values into the output.
  * `k_center` [layers, kv_heads, head_dim] float32, keys only: a static per-channel offset
    (calibrated, jaxserve/runner/kv_calibration.py) subtracted before quantizing and never added
    back. Every key a query sees is shifted by the same vector, so its scores move by one constant
    and softmax does not change; the codes then spend their range on how keys differ, not on the
    large offset most keys share. Not valid with a logit soft cap.
  * `block_scale`: a dynamic scale per (token, kv head, group of `group` channels), computed from
    the data when the token is written (4-bit formats only; 8-bit formats need none).
  * quantized formats store keys and values rotated by a normalized Hadamard matrix over head_dim
    (as QuaRot does): an orthogonal change of basis that leaves q.k unchanged but spreads a few
    large channels over all of them, so a dot product no longer rides on the rounding of one
    element. The query is rotated the same way before the kernel and the output rotated back
    after it (common.py), so kernels never see the rotation.

Page arrays (one set for keys, one for values), per format:
    codes   [layers, num_pages, page_size, kv_heads, head_dim // codes_per_byte]
    scales  [layers, num_pages, page_size, kv_heads, head_dim // group]  (4-bit formats, else None)
4-bit codes pack channel d in the low nibble and channel d + head_dim/2 in the high nibble of
byte d, so unpacking is a concatenation of two halves.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.kv_formats import (E2M1_MAX, E4M3_MAX, FORMATS, FP8_HEADROOM, INT8_HEADROOM, KV_CACHE_DTYPES,
                                       KVFormat, bytes_per_page, kv_format)

__all__ = ["E2M1_MAX", "E4M3_MAX", "FORMATS", "FP8_HEADROOM", "INT8_HEADROOM", "KV_CACHE_DTYPES", "KVFormat",
           "KVPages", "bytes_per_page", "channel_scales", "decode_float_codes", "decode_scales", "dequantize",
           "dequantize_halves", "hadamard", "kv_format", "quantize", "rotate", "unpack_halves"]

# 4-bit block scales tried per block: the e4m3 value just above absmax / top code, and the next ones
# down (each e4m3 step is 6-12%). Alice ch. I-III, ctx 2048, nvfp4: +5.52% with fractions 1.0-0.8 of
# absmax / 6 rounded to nearest, +4.74% with 5 steps down from the rounded-up value.
SCALE_STEPS = 5
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between the magnitudes 0 .5 1 1.5 2 3 4 6
_PAGE_FIELDS = ("k", "v", "k_scale", "v_scale", "k_chan", "v_chan", "k_center")


@dataclasses.dataclass(frozen=True)
class KVPages:
    """The whole model's paged KV cache. Page 0 is the null page padding tokens write to. A pytree
    whose arrays are its children and whose format is static data (kernels read `kv.format`)."""
    k: jax.Array                    # codes, see the module docstring
    v: jax.Array
    k_scale: jax.Array | None = None  # block scales (4-bit formats)
    v_scale: jax.Array | None = None
    k_chan: jax.Array | None = None   # [layers, kv_heads, head_dim] float32 (quantized formats)
    v_chan: jax.Array | None = None
    k_center: jax.Array | None = None  # [layers, kv_heads, head_dim] float32, rotated basis (see above)
    format: KVFormat = dataclasses.field(kw_only=True)

    def replace(self, **arrays) -> "KVPages":
        return dataclasses.replace(self, **arrays)

    def map(self, fn) -> "KVPages":
        """fn(field name, array) for every array present (None stays None): specs, shardings, shapes."""
        return self.replace(**{f: None if getattr(self, f) is None else fn(f, getattr(self, f)) for f in _PAGE_FIELDS})

    @property
    def page_arrays(self) -> tuple:
        """The arrays that take page memory: codes and block scales (not the per-channel ones)."""
        return tuple(a for a in (self.k, self.v, self.k_scale, self.v_scale) if a is not None)

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(cls, fmt: KVFormat, layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
              k_chan=None, v_chan=None, k_center=None) -> "KVPages":
        lead = (layers, num_pages, page_size, kv_heads)
        codes = lambda: jnp.zeros(lead + (head_dim // 2 if fmt.packed else head_dim,), fmt.codes_dtype)  # noqa: E731
        scales = lambda: None if fmt.group is None else jnp.zeros(lead + (head_dim // fmt.group,), fmt.scale_dtype)  # noqa: E731
        if fmt.quantized and (k_chan is None or v_chan is None):
            raise ValueError(f"kv_cache_dtype {fmt.name} needs calibrated channel scales")
        return cls(codes(), codes(), scales(), scales(), k_chan, v_chan, k_center, format=fmt)


jax.tree_util.register_dataclass(KVPages, data_fields=list(_PAGE_FIELDS), meta_fields=["format"])


def hadamard(d: int):
    """Normalized Sylvester Hadamard matrix [d, d] (symmetric and its own inverse); None unless d is
    a power of two."""
    if d & (d - 1):
        return None
    h = jnp.ones((1, 1), jnp.float32)
    while h.shape[0] < d:
        h = jnp.block([[h, h], [h, -h]])
    return h / jnp.sqrt(jnp.float32(d))


def rotate(x, fmt: KVFormat):
    """x [..., head_dim] -> the basis quantized pages are stored in (applying it twice is identity)."""
    h = hadamard(x.shape[-1]) if fmt.quantized else None
    return x if h is None else jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)


def channel_scales(amax, fmt: KVFormat):
    """Calibrated |rotate(x)| max per [layers, kv_heads, head_dim] -> the format's channel scale."""
    return jnp.maximum(amax.astype(jnp.float32), 1e-6) / fmt.chan_max


# ---- encoding (at write time; XLA only) -------------------------------------------------------

def _e2m1_encode(x):
    """float32 -> 4-bit e2m1 codes (sign bit 3, magnitude index 0..7), round to nearest."""
    mag = sum((jnp.abs(x) > m).astype(jnp.uint8) for m in _E2M1_MIDPOINTS)
    return jnp.where(x < 0, mag | 8, mag).astype(jnp.uint8)


def quantize(x, chan, fmt: KVFormat, center=None):
    """New values x [tokens, kv_heads, head_dim] -> (codes, block scales or None) in page layout.
    chan [kv_heads, head_dim] is this layer's channel scale (None for float formats); center
    [kv_heads, head_dim], keys only, is subtracted first (see k_center above)."""
    if not fmt.quantized:
        return _to_codes(x, fmt), None
    xr = rotate(x, fmt) if center is None else rotate(x, fmt) - center
    xn = xr / chan  # [T, H, D]; calibrated max -> fmt.chan_max
    if fmt.name == "fp8":
        return _to_codes(jnp.clip(xn, -E4M3_MAX, E4M3_MAX), fmt), None
    if fmt.name == "int8":
        return jnp.clip(jnp.round(xn), -127, 127).astype(jnp.int8), None
    t, h, d = xn.shape
    groups = xn.reshape(t, h, d // fmt.group, fmt.group)
    scale = _best_block_scale(groups, fmt)  # [T, H, D/group] in fmt.scale_bits_of
    s = scale.astype(jnp.float32)[..., None]
    codes = _encode_4bit(groups / jnp.where(s > 0, s, 1.0), fmt).reshape(t, h, d)
    lo, hi = codes[..., : d // 2], codes[..., d // 2:]
    packed = ((hi << 4) | (lo & 0xF)).astype(jnp.uint8).view(fmt.codes_dtype)
    return packed, jax.lax.bitcast_convert_type(scale, fmt.scale_dtype)


def _to_codes(x, fmt: KVFormat):
    if fmt.bits_of is None:
        return x.astype(fmt.codes_dtype)
    return jax.lax.bitcast_convert_type(x.astype(fmt.bits_of), fmt.codes_dtype)


def decode_float_codes(codes, fmt: KVFormat):
    """Codes of an unpacked format -> their values in the format's own float type (bfloat16,
    float8_e4m3fn) or, for int8/float32, unchanged."""
    return codes if fmt.bits_of is None else jax.lax.bitcast_convert_type(codes, fmt.bits_of)


def decode_scales(scales, fmt: KVFormat):
    """Stored block scales (e4m3 bits) -> float32, by integer ops like the e4m3 codes: XLA:CPU may
    fuse the decode into every element a scale multiplies."""
    return _e4m3_decode(scales.astype(jnp.int32))


def _encode_4bit(y, fmt: KVFormat):
    """Scaled values -> int32 codes: int4 in [-7, 7], nvfp4 as e2m1 bit patterns."""
    return jnp.clip(jnp.round(y), -7, 7).astype(jnp.int32) if fmt.name == "int4" else _e2m1_encode(y).astype(jnp.int32)


def _decode_4bit(codes, fmt: KVFormat):
    return codes.astype(jnp.float32) if fmt.name == "int4" else _e2m1_decode(codes)


def _best_block_scale(groups, fmt: KVFormat):
    """Per block [..., group]: of SCALE_STEPS e4m3 scales from the smallest one that fits absmax on
    the top code downwards, the one with the least squared error. Clipping the largest value a little
    often buys finer steps for the rest. Positive e4m3 values are ordered like their bits, so stepping
    down is subtracting from the bits. (Letting int4 use code -8 too measured worse: +5.06% vs +4.91%.)"""
    top = 7.0 if fmt.name == "int4" else E2M1_MAX
    fit = jnp.clip(jnp.abs(groups).max(-1) / top, 0, E4M3_MAX)
    near = fit.astype(jnp.float8_e4m3fn)
    bits = jax.lax.bitcast_convert_type(near, jnp.uint8).astype(jnp.int32)
    bits = jnp.where(near.astype(jnp.float32) < fit, bits + 1, bits)  # round up: the first never clips
    best, best_err = None, None
    for step in range(SCALE_STEPS):
        scale = jax.lax.bitcast_convert_type(jnp.clip(bits - step, 0, 0x7E).astype(jnp.uint8), jnp.float8_e4m3fn)
        s = scale.astype(jnp.float32)[..., None]
        err = ((_decode_4bit(_encode_4bit(groups / jnp.where(s > 0, s, 1.0), fmt), fmt) * s - groups) ** 2).sum(-1)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = jnp.where(better, scale, best), jnp.where(better, err, best_err)
    return best


# ---- decoding (inside kernels) ----------------------------------------------------------------

def _e2m1_decode(c):
    """4-bit e2m1 codes (int32, values 0..15) -> float32, built as float32 bit patterns (integer ops
    only: far cheaper on CPU than selecting among the eight magnitudes)."""
    e, m = (c >> 1) & 3, c & 1
    normal = ((e + 126) << 23) | (m << 22)           # (1 + m/2) * 2^(e-1)
    bits = jnp.where(e == 0, m * 0x3F000000, normal)  # subnormal: m * 0.5
    return jax.lax.bitcast_convert_type(bits | ((c & 8) << 28), jnp.float32)


def _e4m3_decode(b):
    """fp8 e4m3fn bytes (int32, 0..255) -> float32 by integer ops: on XLA:CPU about twice as fast as
    converting float8_e4m3fn, which dominated fp8 decode. Exact for every code but the NaNs (0x7F,
    0xFF -> +-480), which quantize never writes."""
    mag = b & 0x7F
    normal = jax.lax.bitcast_convert_type((mag << 20) + (120 << 23), jnp.float32)  # rebias 7 -> 127
    v = jnp.where(mag < 8, mag.astype(jnp.float32) * 2.0 ** -9, normal)  # subnormals: m * 2^-9
    return jnp.where(b >= 128, -v, v)


def unpack_halves(codes, fmt: KVFormat):
    """Packed bytes [..., D/2] -> (channels [0, D/2), channels [D/2, D)) as float32 code values
    (before block scales): the low and the high nibbles."""
    c = codes.astype(jnp.int32)
    if fmt.name == "int4":  # int8 bytes: sign-extended
        return ((c << 28) >> 28).astype(jnp.float32), (c >> 4).astype(jnp.float32)
    return _e2m1_decode(c & 0xF), _e2m1_decode((c >> 4) & 0xF)


def dequantize_halves(codes, scales, fmt: KVFormat):
    """Packed page codes [..., D/2] and block scales [..., D/group] -> the two halves of the
    channels, float32 [..., D/2] each, still divided by the channel scale. Keeping the halves apart
    spares XLA:CPU a concatenation inside every fused gather (4x the cost of the unpacking itself);
    splitting further, one part per block scale with the scales folded into scores and
    probabilities, measured slower (more, smaller dots)."""
    s = decode_scales(scales, fmt)  # [..., D/group]
    n = s.shape[-1] // 2
    return tuple(_scale_groups(v, s[..., i * n:(i + 1) * n], fmt) for i, v in enumerate(unpack_halves(codes, fmt)))


def _scale_groups(vals, s, fmt: KVFormat):
    """vals [..., n * group] times block scales s [..., n], each over its group of channels."""
    return (vals.reshape(vals.shape[:-1] + (s.shape[-1], fmt.group)) * s[..., None]).reshape(vals.shape)


def dequantize(codes, scales, fmt: KVFormat):
    """A block of page codes [..., D or D/2] (+ block scales [..., D/group]) -> float32 [..., D],
    still divided by the channel scale. For use on blocks inside kernels, never on a whole cache."""
    if fmt.name == "fp8":
        return _e4m3_decode(codes.astype(jnp.int32))
    if not fmt.packed:
        return decode_float_codes(codes, fmt).astype(jnp.float32)
    return jnp.concatenate(dequantize_halves(codes, scales, fmt), axis=-1)
