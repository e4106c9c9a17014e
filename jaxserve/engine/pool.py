"""EnginePool: engines (one per data-parallel replica), each driven by its own AsyncEngine thread,
for the gRPC server and batch jobs alike.

A new request goes to the replica with the fewest requests in flight; the pool remembers where
each request lives so Abort finds it. Admission control lives here too: at most
`max_num_seqs` running plus `max_queued_requests` waiting per pool; beyond that `generate` raises
QueueFullError (the server answers RESOURCE_EXHAUSTED) instead of queueing without bound.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import AsyncIterator

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.engine import Engine
from jaxserve.engine.outputs import EngineInfo, EngineStats, RequestDelta
from jaxserve.sampling_params import SamplingParams


class QueueFullError(RuntimeError):
    pass


class DuplicateRequestError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class PoolStats:
    pages_total: int
    pages_free: int
    running: int
    waiting: int
    in_flight: int
    kv_cache_usage: float  # mean over replicas
    role: str = "colocated"
    # Disaggregated serving (jaxserve.disagg), summed over both sides: exported requests whose
    # pages are pinned, imports whose pages are on the way, and the transfer totals.
    exports_pinned: int = 0
    imports_in_flight: int = 0
    transfers_completed: int = 0
    transfer_failures: int = 0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    exports_expired: int = 0
    exports: int = 0
    export_prefill_seconds: float = 0.0
    imports_refused: int = 0


_SUMMED = ("transfers_completed", "transfer_failures", "transfer_bytes", "transfer_seconds", "exports_expired",
           "exports", "export_prefill_seconds", "imports_refused")


def sum_stats(per_engine: list[EngineStats], in_flight: int, role: str = "colocated") -> PoolStats:
    total = lambda name: sum(getattr(s, name) for s in per_engine)  # noqa: E731
    return PoolStats(total("pages_total"), total("pages_free"), total("num_running"), total("num_waiting"), in_flight,
                     total("kv_cache_usage") / len(per_engine), role, total("num_exported"), total("num_receiving"),
                     **{name: total(name) for name in _SUMMED})


class EnginePool:
    role = "colocated"  # "prefill" on a prefill server (jaxserve.disagg.remote)

    def __init__(self, engines: list[Engine], max_queued_requests: int):
        if not engines:
            raise ValueError("EnginePool needs at least one engine")
        self.replicas = [AsyncEngine(e) for e in engines]
        self._engines = engines
        self.capacity = sum(e.info().max_num_seqs for e in engines) + max_queued_requests
        self._where: dict[str, int] = {}  # request id -> replica index, while in flight

    def info(self) -> EngineInfo:
        """The first replica's facts (the model and limits are the same on every replica)."""
        return self._engines[0].info()

    @property
    def tokenizer(self):
        return self._engines[0].tokenizer

    @property
    def kv_spec(self) -> str:
        return self._engines[0].kv_spec

    async def start(self) -> None:
        """Called once the server's event loop runs (nothing to connect here)."""

    @property
    def in_flight(self) -> int:
        return len(self._where)

    @property
    def is_running(self) -> bool:
        return all(r.is_running for r in self.replicas)

    @contextlib.asynccontextmanager
    async def generate(self, prompt, params: SamplingParams, request_id: str, priority: int,
                       export: bool = False) -> AsyncIterator[AsyncIterator[RequestDelta]]:
        """`async with pool.generate(...) as deltas:` admits the request (or raises QueueFullError /
        DuplicateRequestError at once); leaving the block early aborts it and frees its pages."""
        if request_id in self._where:
            raise DuplicateRequestError(f"request_id {request_id!r} is already in flight")
        if self.in_flight >= self.capacity:
            raise QueueFullError(f"full: {self.in_flight} requests in flight "
                                 f"(capacity {self.capacity}); retry later")
        index = min(range(len(self.replicas)), key=self._load)
        self._where[request_id] = index
        stream = self.replicas[index].generate(prompt, params, request_id, priority, export=export)
        try:
            async with contextlib.aclosing(stream):
                yield stream
        finally:
            self._where.pop(request_id, None)

    def _load(self, index: int) -> int:
        return sum(1 for i in self._where.values() if i == index)

    async def abort(self, request_id: str) -> bool:
        index = self._where.get(request_id)
        return index is not None and await self.replicas[index].abort(request_id)

    async def stats(self) -> PoolStats:
        """Counters read on each engine's thread, between steps."""
        per_replica = [await r.call(lambda engine: engine.stats()) for r in self.replicas]
        return sum_stats(per_replica, self.in_flight, self.role)

    def snapshot(self) -> PoolStats:
        """The same counters read from this thread without waiting (plain ints; at worst one step
        stale): for metrics scrapes, which must not queue behind a step."""
        return sum_stats([e.stats() for e in self._engines], self.in_flight, self.role)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        for r in self.replicas:
            r.shutdown(timeout)
