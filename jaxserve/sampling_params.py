"""SamplingParams: what a request asks of the sampler. Host-side; validation names the bad field."""
from __future__ import annotations

import dataclasses
import math

from jaxserve.errors import InvalidRequestError

MAX_LOGPROBS = 20  # the sampler always computes this many top log-probabilities when any are asked for


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0   # 0 means greedy
    top_p: float = 1.0         # nucleus mass kept, in (0, 1]
    top_k: int = 0             # 0 (or -1) keeps the whole vocabulary
    min_p: float = 0.0         # drop tokens below min_p * (probability of the most likely token)
    repetition_penalty: float = 1.0  # > 1 discourages any token already in prompt or output (HF/CTRL rule)
    presence_penalty: float = 0.0    # subtracted once from tokens already generated
    frequency_penalty: float = 0.0   # subtracted per occurrence in the generated tokens
    seed: int | None = None    # makes sampling reproducible per request
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()           # stop strings, excluded from the returned text
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None          # top-n log-probabilities per generated token (0..MAX_LOGPROBS)
    prompt_logprobs: bool = False        # the log-probability of every prompt token given those before it

    def __post_init__(self):
        # Accept a single stop string or lists from callers; store tuples so params stay hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self.validate()

    def validate(self):
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_number("temperature", self.temperature, "must be >= 0", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "must be in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", self.top_k, low=-1)
        _check_number("min_p", self.min_p, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number("repetition_penalty", self.repetition_penalty, "must be > 0", lambda v: v > 0)
        _check_number("presence_penalty", self.presence_penalty, "must be in [-2, 2]", lambda v: -2 <= v <= 2)
        _check_number("frequency_penalty", self.frequency_penalty, "must be in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**31 - 1)
        for name in ("ignore_eos", "prompt_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop must hold non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, low=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _check_number(field: str, value, rule: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise InvalidRequestError(f"{field} {rule}, got {value!r}")


def _check_int(field: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
        raise InvalidRequestError(f"{field} must be {bound}, got {value!r}")
