"""What the sync and async clients share: request building, result types, error mapping.
Only grpc and the generated protos: no engine code and no jax, so the client library stays light."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import grpc

from jaxserve.errors import JaxServeError as _BaseError
from jaxserve.usage import Usage
from jaxserve.v1 import jaxserve_pb2 as pb

# Keyword sampling parameters, mirroring jaxserve.SamplingParams.
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed", "ignore_eos", "stop", "stop_token_ids",
                   "logprobs", "prompt_logprobs")
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


class JaxServeError(_BaseError):
    """A failed call: `.code` is the grpc.StatusCode, `.message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


def error_from(e: grpc.RpcError) -> JaxServeError:
    return JaxServeError(e.code(), e.details() or "")


@dataclasses.dataclass(frozen=True)
class Timings:
    queue_time_s: float
    ttft_s: float
    e2e_s: float


@dataclasses.dataclass(frozen=True)
class Delta:
    """One streamed message: the new tokens and the text they complete. The last one has
    `finished` set, with finish_reason, usage and server-side timings."""
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple = ()                 # pb.TokenLogprob per new token, when asked for
    prompt_logprobs: tuple[float, ...] | None = None
    finished: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None


@dataclasses.dataclass
class Result:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list = dataclasses.field(default_factory=list)
    prompt_logprobs: list[float] | None = None

    def add(self, delta: Delta) -> "Result":
        self.request_id = delta.request_id
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = list(delta.prompt_logprobs)
        if delta.finished:
            self.finish_reason, self.usage, self.timings = delta.finish_reason, delta.usage, delta.timings
        return self


def delta_of(msg: pb.GenerateResponse) -> Delta:
    done = msg.HasField("complete")
    c = msg.complete
    return Delta(
        request_id=msg.request_id, token_ids=tuple(msg.token_ids), text=msg.text, logprobs=tuple(msg.logprobs),
        prompt_logprobs=tuple(msg.prompt_logprobs) if msg.prompt_logprobs else None, finished=done,
        finish_reason=FINISH_REASONS.get(c.finish_reason) if done else None,
        usage=Usage(c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_prompt_tokens) if done else None,
        timings=Timings(c.timings.queue_time_s, c.timings.ttft_s, c.timings.e2e_s) if done else None)


def sampling_message(kwargs: dict) -> pb.SamplingParams:
    unknown = set(kwargs) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(SAMPLING_FIELDS)})")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = [kwargs["stop"]]
    return pb.SamplingParams(**kwargs)


def generate_request(prompt: str | Sequence[int] | None = None, *, messages: Sequence[dict] | None = None,
                     request_id: str | None = None, priority: int = 0, **sampling) -> pb.GenerateRequest:
    """prompt: text or token ids; or `messages` (chat). Sampling keywords as in SamplingParams."""
    req = pb.GenerateRequest(sampling=sampling_message(sampling), request_id=request_id or "", priority=priority)
    if messages is not None:
        req.chat.CopyFrom(pb.Chat(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]))
    elif isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.CopyFrom(pb.TokenIds(ids=list(prompt)))
    return req


def tokenize_request(text: str | None, messages, add_special_tokens: bool) -> pb.TokenizeRequest:
    if messages is not None:
        return pb.TokenizeRequest(chat=pb.Chat(messages=[pb.ChatMessage(**m) for m in messages]))
    return pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)


HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
