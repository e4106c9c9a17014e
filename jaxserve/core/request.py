"""One generation request as the paged engine tracks it on the host: tokens, progress, status,
its text so far and the rules that end it (EOS, stop tokens, length, stop strings).

Pure Python: the scheduler and block manager read and advance these; the model runner never sees them.
"""
from __future__ import annotations

import dataclasses
import enum
import time

from jaxserve.core.detokenizer import IncrementalDetokenizer
from jaxserve.sampling_params import SamplingParams
from jaxserve.usage import Usage


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Disaggregated serving (jaxserve/disagg): a prefill engine's request whose first token is
    # sampled and whose pages wait, pinned, for the decode side to confirm receipt; and a decode
    # engine's imported request whose pages are reserved while its KV is on the way.
    EXPORTED = "exported"
    RECEIVING = "receiving"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """"stop" | "length" | "abort" for finished statuses, None while the request is alive."""
        return self.value if self.is_finished else None


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED})


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0  # lower value is served first; arrival order breaks ties
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # set by the scheduler at first admission (queue time)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    # Tokens whose KV is in the request's pages. Reset to 0 by preemption (recompute).
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at first admission (a metric; not reset by preemption).
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # The seed the sampler uses: params.seed, or one drawn once by the scheduler so that a
    # preempted request resamples the same tokens when it recomputes.
    sampling_seed: int | None = None
    # Turns output tokens into text and finds stop strings; None: no text (no tokenizer given).
    detokenizer: IncrementalDetokenizer | None = None
    # prompt_logprobs: {position: log-probability} gathered chunk by chunk, sent with the first token.
    prompt_logprobs: dict[int, float] | None = None
    # Prefill engine of a disaggregated deployment: hand the request over after its first token.
    export: bool = False

    def __post_init__(self):
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.eos_token_ids = frozenset(self.eos_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating the whole history (decode does this per step)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def usage(self) -> Usage:
        return Usage(self.num_prompt_tokens, len(self.output_token_ids), self.num_cached_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_token(self, token_id: int) -> str:
        """Adds a generated token; returns the text it completes ("" without a detokenizer)."""
        self.output_token_ids.append(int(token_id))
        return self.detokenizer.add(int(token_id)) if self.detokenizer is not None else ""

    def check_stop(self) -> RequestStatus | None:
        """The finished status the last generated token implies, or None. Does not set `status`.
        Stop tokens, EOS and length come first; a stop string in the text ends it too."""
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        if last in self.params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if not self.params.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= self.params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.detokenizer is not None and self.detokenizer.stopped:
            return RequestStatus.FINISHED_STOPPED
        return None

    def final_text(self) -> str:
        """At finish: text held back for an incomplete character, unless a stop string cut it."""
        return self.detokenizer.flush() if self.detokenizer is not None else ""

    def add_prompt_logprobs(self, scores: dict[int, float]) -> None:
        self.prompt_logprobs = {**(self.prompt_logprobs or {}), **scores}

    def take_prompt_logprobs(self) -> tuple[float | None, ...] | None:
        """Once, with the first token: one per prompt token, the first None (nothing precedes it)."""
        scores, self.prompt_logprobs = self.prompt_logprobs, None
        if scores is None:
            return None
        return (None,) + tuple(scores.get(p) for p in range(1, self.num_prompt_tokens))
