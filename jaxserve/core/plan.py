"""The step contract: the only things that pass between the scheduler and the runner.

    plan = scheduler.schedule()       # StepPlan: what to run this step
    output = runner.execute(plan)     # RunnerOutput: what the model produced
    updates = scheduler.update(plan, output)

Both are frozen and hold plain Python values (no arrays), so the host side never imports jax and
a plan can be logged, replayed or sent to another process. A chunk may carry several tokens for a
running request (a prefill chunk, a recompute after preemption, and later draft tokens to verify),
and the runner answers each request with a list of accepted tokens, so speculative decoding fits
without changing either side's signature.
"""
from __future__ import annotations

import dataclasses

from jaxserve.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """One request's share of a step."""
    request_id: str
    token_ids: tuple[int, ...]   # fed this step: a prompt chunk, or the last sampled token when decoding
    start_position: int          # position of token_ids[0] (num_computed_tokens before this step)
    page_table: tuple[int, ...]  # pages covering positions [0, start_position + len(token_ids))
    samples: bool                # reaches the request's last known token, so a new token is sampled
    # The sampling row: what the runner's sampler needs for this request.
    params: SamplingParams
    seed: int                    # params.seed, or one drawn once per request (stable across preemption)
    history: tuple[int, ...]     # penalised requests at admission: tokens already cached (prefix hits), else ()
    num_prompt_tokens: int
    prompt_targets: tuple[int, ...] = ()  # prompt_logprobs: the prompt token after each fed token, while known

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_position(self) -> int:
        return self.start_position + len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class PageImport:
    """KV pages that arrived from a prefill engine, written into the pool before this step's forward.
    Transferred page i (of the request's first pages_needed(prompt) pages) goes to page_ids[i -
    first_page]; pages before first_page were prefix-cache hits on this side and are not written."""
    request_id: str
    first_page: int
    page_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the scheduler asks of one step."""
    chunks: tuple[ScheduledChunk, ...]  # running requests first, then newly admitted
    num_tokens: int                     # sum of chunk lengths, <= max_num_batched_tokens
    preempted_ids: tuple[str, ...]      # lost their pages this step (recompute later)
    # Requests that finished or were aborted since the previous plan: the runner releases whatever
    # it holds for them (sampling rows) before it admits this plan's chunks.
    finished_ids: tuple[str, ...] = ()
    imports: tuple[PageImport, ...] = ()  # written first; their requests may have chunks in this plan

    @property
    def is_empty(self) -> bool:
        """Nothing to run or write (there may still be rows to release)."""
        return not self.chunks and not self.imports


@dataclasses.dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]  # (token id, logprob), best first; () when not asked


@dataclasses.dataclass(frozen=True)
class RunnerOutput:
    """What one step produced, per request."""
    # Every chunk that samples gets its accepted tokens in order (one today; with draft tokens, the
    # accepted drafts and the bonus token).
    sampled: dict[str, tuple[SampledToken, ...]]
    # prompt_logprobs chunks: {position of the scored prompt token: its log-probability}
    prompt_logprobs: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)

