"""Conversions between the v1 protos and the engine's types. No grpc here, only messages."""
from __future__ import annotations

from jaxserve.engine.outputs import EngineInfo, RequestDelta
from jaxserve.errors import InvalidRequestError
from jaxserve.sampling_params import SamplingParams
from jaxserve.v1 import jaxserve_pb2 as pb

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
# Optional proto fields that map 1:1 onto SamplingParams fields of the same name.
_OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "logprobs")
# proto3 floats are float32: 0.9 arrives as 0.899999976. Round back to the 7 significant digits
# float32 holds, so a client's 0.9 is the engine's 0.9 (same sampling as LLM.generate).
_FLOAT_FIELDS = frozenset({"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                           "frequency_penalty"})


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """Unset fields take SamplingParams' defaults; bad values raise InvalidRequestError naming the field."""
    kwargs = {}
    for name in _OPTIONAL_FIELDS:
        if msg.HasField(name):
            value = getattr(msg, name)
            kwargs[name] = float(f"{value:.7g}") if name in _FLOAT_FIELDS else value
    return SamplingParams(**kwargs, ignore_eos=msg.ignore_eos, stop=tuple(msg.stop),
                          stop_token_ids=tuple(msg.stop_token_ids), prompt_logprobs=msg.prompt_logprobs)


def sampling_message(params: SamplingParams) -> pb.SamplingParams:
    """The reverse of sampling_params (a decode server forwarding a request to a prefill server)."""
    msg = pb.SamplingParams(ignore_eos=params.ignore_eos, stop=list(params.stop),
                            stop_token_ids=list(params.stop_token_ids), prompt_logprobs=params.prompt_logprobs)
    for name in _OPTIONAL_FIELDS:
        value = getattr(params, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def chat_messages(chat: pb.Chat) -> list[dict]:
    if not chat.messages:
        raise InvalidRequestError("chat.messages is empty")
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def prompt_of(request: pb.GenerateRequest, tokenizer) -> str | list[int]:
    """The engine prompt: text as is (the engine tokenizes it), ids as a list, chat rendered to ids."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("input: set one of text, token_ids or chat")
    if kind == "text":
        return request.text  # empty text is refused by the engine ("prompt is empty")
    if kind == "token_ids":
        return list(request.token_ids.ids)
    if tokenizer is None:
        raise InvalidRequestError("chat: this model has no tokenizer; send token_ids")
    try:
        return tokenizer.encode_chat(chat_messages(request.chat))
    except ValueError as e:  # TokenizerError: bad roles, template errors
        raise InvalidRequestError(f"chat: {e}") from None


def generate_response(delta: RequestDelta, timings: pb.Timings | None) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=delta.request_id, token_ids=delta.new_token_ids, text=delta.text)
    for s in delta.logprobs or ():
        msg.logprobs.add(token_id=s.token_id, logprob=s.logprob,
                         top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in s.top_logprobs])
    if delta.prompt_logprobs is not None:
        msg.prompt_logprobs.extend(delta.prompt_logprobs[1:])  # the first prompt token has none
    if delta.finished:
        u = delta.usage
        msg.complete.CopyFrom(pb.Completion(
            finish_reason=FINISH_REASONS.get(delta.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
            usage=pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                           cached_prompt_tokens=u.cached_prompt_tokens),
            timings=timings))
    return msg


def model_info(name: str, info: EngineInfo) -> pb.ModelInfo:
    cfg = info.model_config
    return pb.ModelInfo(
        model=name, architecture=cfg.architecture, dtype=info.dtype, vocab_size=cfg.vocab_size,
        max_model_len=info.max_model_len, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        eos_token_ids=list(info.eos_token_ids), has_chat_template=info.has_chat_template,
        num_experts=cfg.num_experts, num_experts_per_token=cfg.num_experts_per_token)
