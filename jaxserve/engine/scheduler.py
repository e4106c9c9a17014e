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
import dataclasses
import random
import time

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.request import Request, RequestStatus
from jaxserve.errors import InvalidRequestError
from jaxserve.sampling_params import SamplingParams

_MAX_SEED = 2**31 - 1  # SamplingParams accepts seeds up to this


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    token_ids: tuple[int, ...]   # fed this step: a prompt chunk, or the last sampled token when decoding
    start_position: int          # position of token_ids[0] (num_computed_tokens before this step)
    page_table: tuple[int, ...]  # pages covering positions [0, start_position + len(token_ids))
    samples: bool                # reaches the request's last known token, so a new token is sampled
    params: SamplingParams
    seed: int                    # params.seed, or one drawn once per request (stable across preemption)
    history: tuple[int, ...]     # penalised requests at admission: tokens already cached (prefix hits), else ()
    num_prompt_tokens: int
    prompt_targets: tuple[int, ...] = ()  # prompt_logprobs: the prompt token after each fed token, while known

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    chunks: tuple[ScheduledChunk, ...]  # running requests first, then newly admitted
    num_tokens: int                     # sum of chunk lengths, <= max_num_batched_tokens
    preempted_ids: tuple[str, ...]

    @property
    def is_empty(self) -> bool:
        return not self.chunks


def _queue_key(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time


class Scheduler:
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
        self._seed_rng = random.Random()

    # --- queue management --------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

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
        """End a request early (the engine calls this for stop strings). Unknown ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"finish needs a finished status, got {status}")
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request_id)

    # --- scheduling --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        i = 0
        # Victims always come from the tail, at or after i, so index i stays valid.
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._chunk_length(request, request.num_computed_tokens, budget)
            if self._allocate_or_preempt(request, num_new, preempted):
                chunks.append(self._make_chunk(request, num_new))
                budget -= num_new
                i += 1
        # Admitting right after a preemption would take back the pages just freed: wait a step.
        if not preempted:
            chunks.extend(self._admit_waiting(budget))
        return StepPlan(chunks=tuple(chunks), num_tokens=sum(c.num_tokens for c in chunks),
                        preempted_ids=tuple(r.request_id for r in preempted))

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
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=_queue_key)

    def _admit_waiting(self, budget: int) -> list[ScheduledChunk]:
        """Admit from the head of `waiting` while seats, budget and pages last. Stops at the first
        request that does not fit, so none jumps the queue."""
        chunks = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
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
    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[tuple[Request, int]]:
        """Advance every chunk's request by what the step computed and append sampled tokens.

        Returns (request, token) for each request that got a token, finished ones included (their
        status set, pages freed). Chunks of requests aborted since `schedule` are skipped.
        """
        new_tokens = []
        for chunk in plan.chunks:
            request = self._requests.get(chunk.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            if request.num_computed_tokens != chunk.start_position:
                raise RuntimeError(f"plan for {chunk.request_id!r} is stale (applied twice?)")
            request.num_computed_tokens += chunk.num_tokens
            self.block_manager.cache_full_pages(request)
            if not chunk.samples:
                continue
            if chunk.request_id not in sampled:
                raise KeyError(f"no sampled token for request {chunk.request_id!r}")
            token = int(sampled[chunk.request_id])
            request.append_token(token)
            stop = request.check_stop()
            if stop is not None:
                self.finish(request.request_id, stop)
            new_tokens.append((request, token))
        return new_tokens
