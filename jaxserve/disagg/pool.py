"""DisaggPool: prefill engines and decode engines on disjoint devices of one process, behind the
EnginePool interface the server and jobs use. DecodeFront is what it shares with the decode
server of separate processes (remote.py): the decode engines, the import, abort and stats.

A request runs its prompt on a prefill engine (chunked, prefix-cached), whose first sampled token
streams to the client at once; the prefill engine exports it (jaxserve.engine.handoff) and a
decode engine imports it: the decode engine with the most free pages that has a seat and pages for
it, else the request waits (its pages pinned on the prefill side, which stops admitting prompts
when they run out) and tries again. The decode engine fetches the pages with jax.device_put onto
its own layout (asynchronous; its steps go on and write the pages in the first step after they
arrive), then decodes to the end. Each engine runs on its own thread (AsyncEngine).

Every exit path ends the lease on the prefill pages exactly once: received (the decode engine wrote
them), or abandoned (abort or disconnect while waiting for a decode seat, a failed or timed-out
transfer, which the decode engine answers by prefilling the request itself).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import AsyncIterator

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.engine import Engine
from jaxserve.engine.outputs import EngineInfo, RequestDelta
from jaxserve.engine.pool import DuplicateRequestError, PoolStats, QueueFullError, sum_stats
from jaxserve.sampling_params import SamplingParams
from jaxserve.usage import Usage

IMPORT_RETRY_S = (0.005, 0.1)  # first and longest wait between import attempts when decode is full


class DecodeFront:
    """Decode engines behind the pool interface; subclasses say where prompts are prefilled
    (`_prefill`: the request's deltas up to the one carrying its KVExport) and how to abort there."""
    role = "decode"

    def __init__(self, decode: list[Engine], max_queued_requests: int, engines: list[Engine] = ()):
        if not decode:
            raise ValueError("a disaggregated pool needs at least one decode engine")
        self._engines = list(engines) + list(decode)
        for engine in self._engines:  # before any thread runs them
            engine.prepare_transfers()
        self.decode = [AsyncEngine(e) for e in decode]
        self.replicas = list(self.decode)
        self.capacity = sum(e.info().max_num_seqs for e in decode) + max_queued_requests
        self._where: dict[str, tuple[str, int | None]] = {}  # request id -> (phase, replica), while in flight
        self._aborted: set[str] = set()                       # aborted while prefilled elsewhere or waiting

    async def start(self) -> None:
        """Called once the server's event loop runs (connections to other servers)."""

    def info(self) -> EngineInfo:
        """The decode side's facts (it holds the streams); the model is the same on both sides."""
        return self.decode[0].engine.info()

    @property
    def tokenizer(self):
        return self._engines[0].tokenizer

    @property
    def in_flight(self) -> int:
        return len(self._where)

    @property
    def is_running(self) -> bool:
        return all(r.is_running for r in self.replicas)

    @contextlib.asynccontextmanager
    async def generate(self, prompt, params: SamplingParams, request_id: str,
                       priority: int) -> AsyncIterator[AsyncIterator[RequestDelta]]:
        """As EnginePool.generate: admits (or raises QueueFullError / DuplicateRequestError at once);
        leaving the block early aborts the request wherever it is and frees its pages."""
        if request_id in self._where:
            raise DuplicateRequestError(f"request_id {request_id!r} is already in flight")
        if self.in_flight >= self.capacity:
            raise QueueFullError(f"full: {self.in_flight} requests in flight (capacity {self.capacity}); retry later")
        self._where[request_id] = ("prefill", None)
        stream = self._run(prompt, params, request_id, priority)
        try:
            async with contextlib.aclosing(stream):
                yield stream
        finally:
            self._where.pop(request_id, None)
            self._aborted.discard(request_id)

    async def _prefill(self, prompt, params, rid: str, priority: int) -> AsyncIterator[RequestDelta]:
        raise NotImplementedError
        yield

    async def _abort_prefill(self, rid: str, index: int | None) -> bool:
        raise NotImplementedError

    async def _run(self, prompt, params, rid: str, priority: int) -> AsyncIterator[RequestDelta]:
        export, deltas = None, None
        try:
            async for delta in self._prefill(prompt, params, rid, priority):
                export = delta.export
                yield dataclasses.replace(delta, export=None)
            if export is None:  # finished on the prefill side (its first token ended it, or an abort)
                return
            self._where[rid] = ("waiting", None)
            deltas = await self._import(export)
            if deltas is None:  # aborted while it waited for a decode seat
                yield _aborted_delta(export)
                return
        finally:
            # Until a decode engine took it, the lease is ours to end: on abort, on a consumer that
            # left, on any error. Once taken, the decode engine ends it (receipt, abort, fallback).
            if export is not None and deltas is None:
                export.lease.end(received=False)
        async for delta in deltas:
            yield delta

    async def _import(self, export) -> AsyncIterator[RequestDelta] | None:
        """The decode stream of the first engine that takes the request; retries while all are full."""
        rid, wait = export.state.request_id, IMPORT_RETRY_S[0]
        while rid not in self._aborted:
            for i in sorted(range(len(self.decode)), key=lambda i: -self._engines_free_pages(i)):
                deltas = await self.decode[i].open_import(export)
                if deltas is not None:
                    self._where[rid] = ("decode", i)
                    if rid in self._aborted:  # aborted while the import was on its way: its stream says so
                        await self.decode[i].abort(rid)
                    return deltas
            await asyncio.sleep(wait)
            wait = min(2 * wait, IMPORT_RETRY_S[1])
        return None

    def _engines_free_pages(self, i: int) -> int:
        return self.decode[i].engine.stats().pages_free  # plain ints read unlocked: at worst a step stale

    def _load(self, phase: str, index: int) -> int:
        return sum(1 for p, i in self._where.values() if p == phase and i == index)

    async def abort(self, request_id: str) -> bool:
        """Wherever the request is: on a decode engine it is aborted there; before that it is marked,
        the prefill side is told, and it never reaches a decode engine (or is aborted on arrival)."""
        phase, index = self._where.get(request_id, (None, None))
        if phase is None:
            return False
        if phase == "decode":
            return await self.decode[index].abort(request_id)
        self._aborted.add(request_id)
        if phase == "prefill":
            await self._abort_prefill(request_id, index)
        return True

    async def stats(self) -> PoolStats:
        """Both sides' counters, read on each engine's thread between steps."""
        per_engine = [await r.call(lambda engine: engine.stats()) for r in self.replicas]
        return sum_stats(per_engine, self.in_flight, self.role)

    def snapshot(self) -> PoolStats:
        return sum_stats([e.stats() for e in self._engines], self.in_flight, self.role)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        for r in self.replicas:
            r.shutdown(timeout)


class DisaggPool(DecodeFront):
    """Prefill engines of this process (jax.device_put from their meshes to the decode engines')."""
    role = "prefill+decode"

    def __init__(self, prefill: list[Engine], decode: list[Engine], max_queued_requests: int):
        if not prefill:
            raise ValueError("a disaggregated pool needs at least one prefill engine")
        specs = {e.kv_spec for e in prefill + decode}
        if len(specs) > 1:  # checked when the two sides connect, before any request
            raise ValueError(f"prefill and decode KV pages differ: {sorted(specs)} (same model, kv cache "
                             "dtype, page size and transfer format needed)")
        super().__init__(decode, max_queued_requests, engines=prefill)
        for engine in prefill:  # no dead peer in one process; an expired lease would only free pages
            engine.export_leases_expire = False  # whose staged copy the pool still holds
        self.prefill = [AsyncEngine(e) for e in prefill]
        self.replicas = self.prefill + self.decode

    async def _prefill(self, prompt, params, rid: str, priority: int) -> AsyncIterator[RequestDelta]:
        index = min(range(len(self.prefill)), key=lambda i: self._load("prefill", i))
        self._where[rid] = ("prefill", index)
        async for delta in self.prefill[index].generate(prompt, params, rid, priority, export=True):
            yield delta

    async def _abort_prefill(self, rid: str, index: int | None) -> bool:
        return index is not None and await self.prefill[index].abort(rid)


def _aborted_delta(export) -> RequestDelta:
    s = export.state
    return RequestDelta(s.request_id, (), "", True, "abort",
                        Usage(len(s.prompt_token_ids), len(s.output_token_ids), s.num_cached_tokens))
