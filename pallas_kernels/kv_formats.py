"""The KV page formats as plain data: names, code and scale dtypes, bytes per page. No jax import,
so the engine's options, the command line and the host bookkeeping can name and size formats;
pallas_kernels/kv_quant.py holds the math that reads and writes them.

A KVFormat is static (frozen, hashable): it travels with the pages (KVPages.format) into every
kernel, so no kernel ever guesses a format from array dtypes. Dtypes are held by name (jax and
numpy both accept names): codes are plain integer or float32 arrays; `bits_of` names the float
type whose bits they hold.
"""
from __future__ import annotations

import dataclasses

import numpy as np

E2M1_MAX, E4M3_MAX = 6.0, 448.0
FP8_HEADROOM = 4.0  # fp8 precision is relative, so headroom above the calibrated max costs nothing
# int8 steps are uniform, so headroom costs resolution; but the 512 calibration tokens under-range
# later positions of long contexts, and clipping them costs more. Alice ch. I-III, ctx 2048:
# perplexity +1.81% at 1.0, +0.25% at 1.5, +0.42% at 2.0 (0.8: +7.5%).
INT8_HEADROOM = 1.5


@dataclasses.dataclass(frozen=True)
class KVFormat:
    name: str
    codes_dtype: str
    packed: bool = False             # two 4-bit codes per byte
    group: int | None = None         # channels per block scale (None: no block scales)
    scale_dtype: str | None = None
    chan_max: float | None = None    # what the calibrated channel max maps to (None: no channel scale)
    bits_of: str | None = None       # codes hold the bits of this float type (see FORMATS)
    scale_bits_of: str | None = None  # block scales hold the bits of this float type

    @property
    def quantized(self) -> bool:
        return self.chan_max is not None

    def bytes_per_token_head(self, head_dim: int) -> float:
        """Bytes one token of one kv head takes in the pages (keys or values alone)."""
        codes = head_dim // 2 if self.packed else head_dim * np.dtype(self.codes_dtype).itemsize
        scales = 0 if self.group is None else (head_dim // self.group) * np.dtype(self.scale_dtype).itemsize
        return codes + scales


# bfloat16 and fp8 pages (and e4m3 block scales) hold their bits as unsigned ints: XLA:CPU widens
# sub-32-bit floats to float32 around scatters and gathers, which on a whole cache means copying it every layer
# (measured: 4.8 s to write one token per layer into 1 GiB of bfloat16 pages vs 0.3 ms for int8).
# Only the small blocks being written or read are bitcast.
FORMATS = {
    "float32": KVFormat("float32", "float32"),
    "bfloat16": KVFormat("bfloat16", "uint16", bits_of="bfloat16"),
    "fp8": KVFormat("fp8", "uint8", chan_max=E4M3_MAX / FP8_HEADROOM, bits_of="float8_e4m3fn"),
    "int8": KVFormat("int8", "int8", chan_max=127.0 / INT8_HEADROOM),
    # int4: codes -7..7 with an e4m3 scale per 16 channels (as nvfp4, so 4-bit formats differ only in
    # their code grid). Alice ch. I-III before key centers: +4.91-5.43%, vs +5.64-6.00% with a float16
    # scale per 32 channels (with key centers: +4.13%).
    "int4": KVFormat("int4", "int8", packed=True, group=16, scale_dtype="uint8",
                     chan_max=7.0 * E4M3_MAX / FP8_HEADROOM, scale_bits_of="float8_e4m3fn"),
    # nvfp4: e2m1 codes with an e4m3 scale per 16 channels; the channel scale plays NVIDIA's
    # second-level (per-tensor) scale and maps the calibrated max to the top of the e4m3 range.
    "nvfp4": KVFormat("nvfp4", "uint8", packed=True, group=16, scale_dtype="uint8",
                      chan_max=E2M1_MAX * E4M3_MAX / FP8_HEADROOM, scale_bits_of="float8_e4m3fn"),
}
KV_CACHE_DTYPES = ("auto",) + tuple(FORMATS)


def kv_format(name: str, model_dtype="float32") -> KVFormat:
    """`auto` stores pages in the model's dtype (a name, or any numpy/jax dtype)."""
    if name == "auto":
        name = model_dtype if isinstance(model_dtype, str) else np.dtype(model_dtype).name
    if name not in FORMATS:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    return FORMATS[name]


def bytes_per_page(fmt: KVFormat, layers: int, page_size: int, kv_heads: int, head_dim: int) -> int:
    """Real bytes of one page across all layers, keys and values."""
    return int(2 * layers * page_size * kv_heads * fmt.bytes_per_token_head(head_dim))
