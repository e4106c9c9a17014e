"""Which ragged paged attention implementation runs: the XLA path, the native CPU decode kernel, the
Mosaic TPU kernel or the Pallas GPU kernel, picked by the JAX backend. `auto` is the kernel of the
platform (on CPU: native, or XLA where the C++ kernel cannot be built); `pallas` on CPU runs the GPU
kernel in interpret mode (slow; for tests)."""
from __future__ import annotations

import functools

import jax

from jaxserve.ops import native
from jaxserve.ops.attention import ragged_paged_attention_xla

ATTENTION_BACKENDS = ("auto", "xla", "native", "pallas")


def resolve_attention_backend(name: str = "auto", platform: str | None = None) -> str:
    """auto | xla | native | pallas -> the implementation: xla | native | tpu | gpu | gpu-interpret."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    platform = platform or jax.default_backend()
    on_cpu = platform not in ("tpu", "gpu")
    if name == "native":
        if not on_cpu:
            raise ValueError(f"attention backend 'native' runs on CPU only, not {platform}")
        try:
            native.load()
        except (native.NativeUnavailableError, OSError) as error:
            raise ValueError(f"attention backend 'native' is unavailable: {error}") from error
        return "native"
    if name == "auto" and on_cpu:
        return "native" if native.available() else "xla"
    if name == "xla":
        return "xla"
    return {"tpu": "tpu", "gpu": "gpu"}.get(platform, "gpu-interpret")


def attention_impl(impl: str):
    """The function with the contract's signature for an implementation name: xla | native | tpu |
    gpu, or tpu-interpret | gpu-interpret (the kernels interpreted on CPU, for tests)."""
    if impl in ("xla", "native"):
        return functools.partial(ragged_paged_attention_xla, native_decode=impl == "native")
    if impl.startswith("tpu"):
        from jax.experimental.pallas import tpu as pltpu

        from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_tpu
        return functools.partial(ragged_paged_attention_tpu,
                                 interpret=pltpu.InterpretParams() if impl == "tpu-interpret" else None)
    from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu
    if impl == "gpu-interpret":
        return functools.partial(ragged_paged_attention_gpu, interpret=True)
    # Serving: plain bf16 tensor-core dots (H100, Llama-8B shapes: 1.5x faster than float32-exact
    # dots, 1.11x jax's paged_attention; see benchmarks/RESULTS.md).
    return functools.partial(ragged_paged_attention_gpu, dot_pieces=1)
