"""The attention backend: which ragged paged attention implementation an engine runs, decided once
from (platform, KV page format, the `attention_backend` option) and then called by the model.

    xla            the XLA path (jaxserve/ops/attention.py): the CPU fallback and the reference path
    native         the XLA path with single-token queries in the C++ decode kernel (CPU; unpacked pages)
    tpu, gpu       the Mosaic TPU and the Pallas GPU (Triton) kernels (pallas_kernels/)
    *-interpret    those kernels interpreted on CPU (tests)

`auto` is the kernel of the platform: native on CPU (XLA where the C++ kernel cannot be built, and
for 4-bit pages, which it does not read), the Pallas kernel on TPU and GPU. `pallas` on CPU runs the
GPU kernel in interpret mode (slow; for tests). The backend's name is what really runs, so
`Engine.info()` and GetServerInfo report it as it is.

This module imports jax only when a backend is chosen or called, so option parsing stays light.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

log = logging.getLogger(__name__)
ATTENTION_BACKENDS = ("auto", "xla", "native", "pallas")   # the option's values
IMPLEMENTATIONS = ("xla", "native", "tpu", "gpu", "tpu-interpret", "gpu-interpret")


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """Static (hashable): jitted steps take it as a static argument."""
    name: str

    def __post_init__(self):
        if self.name not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {self.name!r}")

    @property
    def uses_xla_plan(self) -> bool:
        return self.name in ("xla", "native")

    def prepare(self, meta, num_tokens: int):
        """Per-step work every layer shares: the XLA path's plan of who attends to what; the
        kernels take the ragged metadata (jaxserve.ops.attention.AttentionMetadata) as it is."""
        if not self.uses_xla_plan:
            return meta
        from jaxserve.ops.attention import plan_attention

        return plan_attention(meta.kv_lens, meta.page_tables, meta.cu_q_lens, meta.num_seqs, num_tokens)

    def __call__(self, q, kv, layer, prepared, *, sm_scale: float, sliding_window: int | None = None,
                 soft_cap: float | None = None):
        """Attention of q [tokens, heads, head_dim] over layer `layer` of the pages `kv`."""
        opts = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        if self.uses_xla_plan:
            from jaxserve.ops.attention import attend

            return attend(q, kv, layer, prepared, native_decode=self.name == "native", **opts)
        m = prepared
        return self._kernel()(q, kv, layer, m.kv_lens, m.page_tables, m.cu_q_lens, m.num_seqs, **opts)

    def _kernel(self):
        if self.name.startswith("tpu"):
            from jax.experimental.pallas import tpu as pltpu

            from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_tpu
            return functools.partial(ragged_paged_attention_tpu,
                                     interpret=pltpu.InterpretParams() if self.name == "tpu-interpret" else None)
        from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu
        if self.name == "gpu-interpret":
            return functools.partial(ragged_paged_attention_gpu, interpret=True)
        # Serving: plain bf16 tensor-core dots (H100, Llama-8B shapes: 1.5x faster than float32-exact
        # dots, 1.11x jax's paged_attention; see benchmarks/RESULTS.md).
        return functools.partial(ragged_paged_attention_gpu, dot_pieces=1)


XLA = AttentionBackend("xla")


def select_attention_backend(option: str = "auto", kv_format=None, platform: str | None = None) -> AttentionBackend:
    """The backend for `option` (auto | xla | native | pallas) on `platform` (default: jax's) with
    pages in `kv_format` (a pallas_kernels.kv_formats.KVFormat; None: unpacked). Raises ValueError
    with the reason when an explicit choice cannot run."""
    if option not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {option!r}")
    if platform is None:
        import jax

        platform = jax.default_backend()
    on_cpu = platform not in ("tpu", "gpu")
    packed = kv_format is not None and kv_format.packed
    if option == "native":
        if not on_cpu:
            raise ValueError(f"attention backend 'native' runs on CPU only, not {platform}")
        if packed:
            raise ValueError(f"attention backend 'native' reads unpacked KV pages only (float32, bfloat16, fp8, "
                             f"int8), not {kv_format.name}; use auto or xla")
        _load_native()
        return AttentionBackend("native")
    if option == "xla":
        return XLA
    if option == "auto" and on_cpu:
        if packed:
            log.info("%s KV pages: attention runs on the XLA path (the native kernel reads unpacked pages)",
                     kv_format.name)
            return XLA
        from jaxserve.ops import native

        return AttentionBackend("native" if native.available() else "xla")
    return AttentionBackend({"tpu": "tpu", "gpu": "gpu"}.get(platform, "gpu-interpret"))


def _load_native() -> None:
    from jaxserve.ops import native

    try:
        native.load()
    except (native.NativeUnavailableError, OSError) as error:
        raise ValueError(f"attention backend 'native' is unavailable: {error}") from error
