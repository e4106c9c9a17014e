"""Token-budget scheduling (vLLM-v1 style): each step is a frozen plan of chunks for the runner.

There are no prefill/decode phases. Every request's num_computed_tokens catches up with its
num_tokens under a per-step budget of max_num_batched_tokens: running requests first (best
priority first), then waiting ones are admitted in (priority, arrival) order. A prompt longer than
the budget is prefilled in chunks over several steps while other requests keep decoding. When
pages run out, the worst running request is preempted by recompute: its pages are freed and it
re-prefills prompt + output later (the prefix cache usually gives most of them back).
"""
from __future__ import annotations

import bisect
import random
import time
from typing import NamedTuple

from jaxserve.core.block_manager import BlockManager
from jaxserve.core.export_import import ExportImportMixin, queue_key as _queue_key
from jaxserve.core.plan import RunnerOutput, SampledToken, ScheduledChunk, StepPlan
from jaxserve.core.request import Request, RequestStatus
from jaxserve.errors import InvalidRequestError

_MAX_SEED = 2**31 - 1  # SamplingParams accepts seeds up to this


class RequestUpdate(NamedTuple):
    """What one step added to one request (`scheduler.update` returns one per request that got tokens)."""
    request: Request
    sampled: tuple[SampledToken, ...]  # the tokens appended, in order (stops at a finishing token)
    text: str                          # the text they complete (stop strings cut, held-back text flushed at finish)


class Scheduler(ExportImportMixin):
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, long_prefill_token_threshold: int | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold or None
        # Both lists stay sorted by (priority, arrival): the head of `waiting` is admitted next and
        # the tail of `running` is the first to be preempted. A preempted request keeps its
        # arrival time, so it returns to the front of its priority class.
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}  # unfinished requests only
        # Disaggregated serving. exported: first token sampled, pages pinned until release_export.
        # receiving: imported with pages reserved; arrived: their KV is on this side's devices.
        self.exported: dict[str, Request] = {}
        self.receiving: dict[str, Request] = {}
        self._arrived: set[str] = set()
        self._fresh_imports: set[str] = set()  # promoted imports whose first chunk is still to come
        self.num_import_fallbacks = 0  # imports whose transfer failed, recomputed here instead
        self._finished_ids: list[str] = []       # finished since the last plan (the runner releases them)
        self._seed_rng = random.Random()
        # Prompt tokens looked up in / served from the prefix cache at first admission (engine stats).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0

    # --- queue management --------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        """Work to do: waiting, running or receiving requests (exported ones only wait for release)."""
        return bool(self.waiting or self.running or self.receiving)

    def unfinished_ids(self) -> list[str]:
        return [r.request_id for r in self.waiting + self.running] + list(self.receiving) + list(self.exported)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None (finished requests are forgotten)."""
        return self._requests.get(request_id)

    def add_request(self, request: Request) -> None:
        self._validate(request)
        if request.sampling_seed is None:
            seed = request.params.seed
            request.sampling_seed = seed if seed is not None else self._seed_rng.randint(0, _MAX_SEED)
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_queue_key)

    def _validate(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request_id {request.request_id!r} is already in use")
        if request.num_prompt_tokens == 0:
            raise InvalidRequestError("prompt must contain at least one token")
        # A request that cannot fit even alone would be preempted forever: refuse it up front.
        bm = self.block_manager
        capacity = bm.num_usable_pages * bm.page_size
        if request.num_prompt_tokens > capacity:
            raise InvalidRequestError(
                f"prompt has {request.num_prompt_tokens} tokens but the KV cache holds at most {capacity}")
        total = request.num_prompt_tokens + request.params.max_tokens
        if bm.pages_needed(total) > bm.num_usable_pages:
            raise InvalidRequestError(
                f"max_tokens {request.params.max_tokens} is too large: prompt ({request.num_prompt_tokens})"
                f" + max_tokens exceeds the KV cache ({capacity} tokens)")

    def abort(self, request_id: str) -> bool:
        """Remove a waiting or running request and free its pages; False if unknown or finished."""
        if request_id not in self._requests:
            return False
        self.finish(request_id, RequestStatus.FINISHED_ABORTED)
        return True

    def finish(self, request_id: str, status: RequestStatus) -> None:
        """End a request: its pages are freed and the next plan tells the runner to release it.
        Unknown ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"finish needs a finished status, got {status}")
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        was = request.status
        if was is RequestStatus.RUNNING:
            self.running.remove(request)
        elif was is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif was is RequestStatus.RECEIVING:
            del self.receiving[request_id]
            self._arrived.discard(request_id)
        else:
            del self.exported[request_id]
        request.status = status
        self._fresh_imports.discard(request_id)
        self.block_manager.free(request_id)
        if was is not RequestStatus.EXPORTED:  # an exported request's row was released at export
            self._finished_ids.append(request_id)

    # --- scheduling --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        promoted = self._promote_arrived()  # {request id: (request, first transferred page)}
        i = 0
        # Victims always come from the tail, at or after i, so index i stays valid.
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._chunk_length(request, request.num_computed_tokens, budget)
            if self._allocate_or_preempt(request, num_new, preempted):
                chunks.append(self._make_chunk(request, num_new, admitted=self._take_fresh(request)))
                budget -= num_new
                i += 1
        # Admitting right after a preemption would take back the pages just freed: wait a step.
        if not preempted:
            chunks.extend(self._admit_waiting(budget))
        # A promoted import preempted in this same plan recomputes instead: its pages are gone.
        imports = tuple(self._page_import(r, first) for r, first in promoted.values()
                        if r.status is RequestStatus.RUNNING)
        finished, self._finished_ids = tuple(self._finished_ids), []
        return StepPlan(chunks=tuple(chunks), num_tokens=sum(c.num_tokens for c in chunks),
                        preempted_ids=tuple(r.request_id for r in preempted), finished_ids=finished,
                        imports=imports)

    def _chunk_length(self, request: Request, num_computed: int, budget: int) -> int:
        num_new = min(request.num_tokens - num_computed, budget)
        if self.long_prefill_token_threshold is not None:
            num_new = min(num_new, self.long_prefill_token_threshold)
        return num_new

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        """Allocate pages for the chunk, preempting from the tail of `running` until it fits.
        False when the request itself had to be preempted (it was the worst one left)."""
        while not self.block_manager.allocate(request, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the KV, keep the output tokens, requeue by (priority, arrival)."""
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        self._fresh_imports.discard(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=_queue_key)

    def _admit_waiting(self, budget: int) -> list[ScheduledChunk]:
        """Admit from the head of `waiting` while seats, budget and pages last. Stops at the first
        request that does not fit, so none jumps the queue."""
        chunks = []
        # Receiving imports hold seats too: they join `running` when their KV arrives.
        while self.waiting and budget > 0 and len(self.running) + len(self.receiving) < self.max_num_seqs:
            request = self.waiting[0]
            num_cached = self.block_manager.lookup_prefix(request)
            num_new = self._chunk_length(request, num_cached, budget)
            # On a request owning no pages, allocate takes the cached prefix and sets num_computed_tokens.
            if not self.block_manager.allocate(request, num_new):
                break
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                self.prefix_cache_queries += request.num_prompt_tokens
                self.prefix_cache_hits += request.num_cached_tokens
            bisect.insort(self.running, request, key=_queue_key)
            chunks.append(self._make_chunk(request, num_new, admitted=True))
            budget -= num_new
        return chunks

    def _make_chunk(self, request: Request, num_new: int, admitted: bool = False) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new
        samples = end == request.num_tokens
        pages = self.block_manager.page_table(request.request_id)[:self.block_manager.pages_needed(end)]
        # The runner counts the tokens it is fed; at admission it also needs those already cached.
        history = tuple(request.token_ids_between(0, start)) if admitted and request.params.has_penalties else ()
        targets = ()
        if request.params.prompt_logprobs and start + 1 < request.num_prompt_tokens:
            targets = tuple(request.token_ids_between(start + 1, min(end + 1, request.num_prompt_tokens)))
        return ScheduledChunk(
            request_id=request.request_id, token_ids=tuple(request.token_ids_between(start, end)),
            start_position=start, page_table=tuple(pages), samples=samples, params=request.params,
            seed=request.sampling_seed, history=history, num_prompt_tokens=request.num_prompt_tokens,
            prompt_targets=targets)

    # --- results -----------------------------------------------------------------------------
    def update(self, plan: StepPlan, output: RunnerOutput) -> list[RequestUpdate]:
        """Advance every chunk's request by what the step computed and append its accepted tokens,
        checking after each whether the request ends (EOS, stop token, length, stop string).

        Returns one update per request that got tokens, finished ones included (their status set,
        pages freed). Chunks of requests aborted since `schedule` are skipped.
        """
        updates = []
        for chunk in plan.chunks:
            request = self._requests.get(chunk.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            if request.num_computed_tokens != chunk.start_position:
                raise RuntimeError(f"plan for {chunk.request_id!r} is stale (applied twice?)")
            request.num_computed_tokens += chunk.num_tokens
            self.block_manager.cache_full_pages(request)
            if chunk.request_id in output.prompt_logprobs:
                request.add_prompt_logprobs(output.prompt_logprobs[chunk.request_id])
            if not chunk.samples:
                continue
            if not output.sampled.get(chunk.request_id):
                raise KeyError(f"no sampled token for request {chunk.request_id!r}")
            updates.append(self._append(request, output.sampled[chunk.request_id]))
        return updates

    def _append(self, request: Request, sampled: tuple[SampledToken, ...]) -> RequestUpdate:
        """Appends accepted tokens until one ends the request; the rest are dropped."""
        text, taken = "", []
        for s in sampled:
            text += request.append_token(s.token_id)
            taken.append(s)
            stop = request.check_stop()
            if stop is not None:
                self.finish(request.request_id, stop)
                text += request.final_text()
                break
        if request.export and request.status is RequestStatus.RUNNING:
            self._export(request)
        return RequestUpdate(request, tuple(taken), text)
