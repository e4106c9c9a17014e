"""EngineConfig: the engine's options, validated by name. No jax import (the CLI builds one before
any heavy import)."""
from __future__ import annotations

import dataclasses

from jaxserve.config import check_router_options
from jaxserve.ops.backends import ATTENTION_BACKENDS
from pallas_kernels.kv_formats import KV_CACHE_DTYPES

DEFAULT_KV_CACHE_MEMORY = 1 << 30


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None          # wins over kv_cache_memory when set
    kv_cache_memory: int | None = None    # bytes for KV pages per device; default 1 GiB
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512     # token budget per step (prefill chunks + decodes)
    max_model_len: int | None = None      # default: the model's context length
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"          # auto (the model dtype) | float32 | bfloat16 | fp8 | int8 | int4 | nvfp4
    # auto (the platform's kernel: native on CPU, xla for 4-bit pages) | xla | native | pallas
    attention_backend: str = "auto"
    # MoE dynamic expert skipping, off by default (see jaxserve.config.ModelConfig): drop a chosen
    # expert whose renormalized router weight is below this / once the kept experts hold this much.
    moe_min_router_weight: float = 0.0
    moe_top_p: float = 1.0
    # Disaggregated serving: the KV pages' wire format between prefill and decode engines (auto: the
    # pool's own, exact; int8: float pages as int8 + a scale per vector), how long a decode engine
    # waits for an import's pages before recomputing the prompt itself, and how long a prefill
    # engine keeps an exported request's pages pinned when nobody confirms or abandons them.
    kv_transfer_dtype: str = "auto"
    kv_transfer_timeout: float = 30.0
    kv_export_lease_timeout: float = 120.0

    @property
    def router_options(self) -> dict:
        """The router options that differ from the plain top-k router ({} when skipping is off)."""
        options = dict(moe_min_router_weight=self.moe_min_router_weight, moe_top_p=self.moe_top_p)
        return {k: v for k, v in options.items() if v != getattr(EngineConfig, k)}

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}; "
                             f"got {self.attention_backend!r}")
        check_router_options(self.moe_min_router_weight, self.moe_top_p)
        if self.kv_transfer_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_transfer_dtype must be auto or int8; got {self.kv_transfer_dtype!r}")
        if self.kv_transfer_timeout <= 0 or self.kv_export_lease_timeout <= 0:
            raise ValueError("kv_transfer_timeout and kv_export_lease_timeout must be positive")

    @property
    def kv_memory(self) -> int:
        return self.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
