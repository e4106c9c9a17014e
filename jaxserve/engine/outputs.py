"""What the engine hands out: per-request deltas of a step, its static facts (info) and its live
counters (stats). Frozen and jax-free, so servers, jobs and metrics depend on these alone."""
from __future__ import annotations

import dataclasses

from jaxserve.config import ModelConfig
from jaxserve.core.plan import SampledToken
from jaxserve.usage import Usage


@dataclasses.dataclass(frozen=True)
class RequestDelta:
    """What one step added to one request."""
    request_id: str
    new_token_ids: tuple[int, ...]
    text: str                          # text completed by the new tokens (stop strings excluded)
    finished: bool
    finish_reason: str | None          # "stop" | "length" | "abort"
    usage: Usage
    logprobs: tuple[SampledToken, ...] | None = None
    prompt_logprobs: tuple[float | None, ...] | None = None  # with the first token: one per prompt token, first None
    queue_time: float | None = None    # on the finished delta: seconds from arrival to first scheduled
    # A prefill engine's request handed over after this delta's first token (jaxserve.engine.handoff.KVExport):
    # the last delta this engine sends for it.
    export: object | None = None


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """Facts fixed when the engine starts."""
    model: str                   # the name or path it was loaded as
    model_config: ModelConfig    # architecture, sizes, heads (frozen; no arrays)
    dtype: str                   # weights' dtype
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    has_tokenizer: bool
    has_chat_template: bool
    platform: str                # cpu | gpu | tpu
    attention_backend: str       # the implementation that runs (jaxserve.ops.backends), not the option
    kv_cache_dtype: str          # the page format's name (auto resolved)
    page_size: int
    num_pages: int               # usable pages (the null page excluded)
    max_num_seqs: int
    max_num_batched_tokens: int
    mesh: tuple[tuple[str, int], ...]  # the engine's mesh axes and sizes; () on one device
    devices: tuple[int, ...]

    @property
    def max_cached_tokens(self) -> int:
        return self.num_pages * self.page_size


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Counters read between (or, unlocked, during) steps: at worst one step stale."""
    pages_total: int
    pages_free: int              # allocatable now, evictable cached pages included
    pages_cached: int            # pages findable by the prefix cache
    num_running: int
    num_waiting: int
    prefix_cache_queries: int    # prompt tokens looked up at first admission
    prefix_cache_hits: int       # of which served from the cache
    num_preemptions: int
    compile_count: int
    # Disaggregated serving: exported requests whose pages are pinned, imports in flight, and totals.
    num_exported: int = 0
    num_receiving: int = 0
    transfers_completed: int = 0
    transfer_failures: int = 0        # imports that fell back to recomputing (failed or timed out)
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0     # summed fetch-to-written time of completed imports
    exports_expired: int = 0          # leases the prefill side ended itself (nobody confirmed)
    exports: int = 0                  # requests exported
    export_prefill_seconds: float = 0.0  # their summed time from first scheduled to export
    imports_refused: int = 0          # import attempts refused for want of a seat or pages (each retried)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.pages_free / self.pages_total if self.pages_total else 0.0
