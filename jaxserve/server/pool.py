"""EnginePool: the server's engines (one per data-parallel replica), each on its own thread.

A new request goes to the replica with the fewest requests in flight; the pool remembers where
each request lives so Abort finds it. Admission control lives here too: at most
`max_num_seqs` running plus `max_queued_requests` waiting per pool; beyond that the server
answers RESOURCE_EXHAUSTED instead of queueing without bound.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import AsyncIterator

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.engine import Engine, RequestDelta
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


def _engine_stats(engine: Engine) -> tuple[int, int, int, int]:
    bm, sched = engine.block_manager, engine.scheduler
    return bm.num_usable_pages, bm.num_free_pages, sched.num_running, sched.num_waiting


class EnginePool:
    def __init__(self, engines: list[Engine], max_queued_requests: int):
        if not engines:
            raise ValueError("EnginePool needs at least one engine")
        self.engines = engines
        self.replicas = [AsyncEngine(e) for e in engines]
        self.capacity = sum(e.config.max_num_seqs for e in engines) + max_queued_requests
        self._where: dict[str, int] = {}  # request id -> replica index, while in flight

    @property
    def in_flight(self) -> int:
        return len(self._where)

    @property
    def is_running(self) -> bool:
        return all(r.is_running for r in self.replicas)

    @contextlib.asynccontextmanager
    async def generate(self, prompt, params: SamplingParams, request_id: str,
                       priority: int) -> AsyncIterator[AsyncIterator[RequestDelta]]:
        """`async with pool.generate(...) as deltas:` admits the request (or raises QueueFullError /
        DuplicateRequestError at once); leaving the block early aborts it and frees its pages."""
        if request_id in self._where:
            raise DuplicateRequestError(f"request_id {request_id!r} is already in flight")
        if self.in_flight >= self.capacity:
            raise QueueFullError(f"the server is full: {self.in_flight} requests in flight "
                                 f"(capacity {self.capacity}); retry later")
        index = min(range(len(self.replicas)), key=self._load)
        self._where[request_id] = index
        stream = self.replicas[index].generate(prompt, params, request_id, priority)
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
        per_replica = [await r.call(_engine_stats) for r in self.replicas]
        total, free, running, waiting = (sum(column) for column in zip(*per_replica))
        return PoolStats(total, free, running, waiting, self.in_flight)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        for r in self.replicas:
            r.shutdown(timeout)
