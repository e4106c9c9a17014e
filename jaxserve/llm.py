"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(...)`, run
through the paged engine."""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

from jaxserve.checkpoint import LoadedModel
from jaxserve.checkpoint.registry import DEFAULT_MODEL
from jaxserve.usage import Usage
from jaxserve.engine import EngineConfig, load_engines
from jaxserve.errors import InvalidRequestError
from jaxserve.parallel import single_engine_mesh
from jaxserve.sampling_params import SamplingParams

Prompt = Union[str, Sequence[int]]


@dataclasses.dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, stop string or stop token) or "length"
    usage: Usage | None = None
    logprobs: list | None = None      # one SampledToken per generated token, when asked for
    prompt_logprobs: list | None = None  # SamplingParams(prompt_logprobs=True): per prompt token, first None


def _as_prompt_list(prompts) -> list[Prompt]:
    """A single prompt (string or token-id list) or a list of them -> a list of prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(t, int) for t in prompts)):
        return [prompts]
    return list(prompts)


class LLM:
    """Offline batch generation. Engine options (EngineConfig fields) may be passed as keywords,
    e.g. LLM("smollm2-135m", kv_cache_memory=2 << 30, max_num_seqs=32)."""

    def __init__(self, model: str | LoadedModel = DEFAULT_MODEL, dtype: str = "auto", progress: bool = True,
                 mesh=None, **engine_options):
        """model: a known name, a checkpoint path, or an already loaded model (shared, not copied).
        mesh: None (one device), a jax Mesh with axes ("tp",) or ("ep", "tp"), or text such as
        "tp=2" or "tp=2,ep=2" (jaxserve.parallel)."""
        config = EngineConfig(**engine_options)
        (self.engine,) = load_engines(model, config, single_engine_mesh(mesh), dtype=dtype, progress=progress)
        self.tokenizer = self.engine.tokenizer
        self.info = self.engine.info()      # the engine's facts (EngineInfo)
        self.config = self.info.model_config

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if not prompts:
            raise InvalidRequestError("prompts is empty")
        params = params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        outputs: dict[str, RequestOutput] = {}
        try:
            for prompt, p in zip(prompts, params):
                ids = self.engine.encode_prompt(prompt)
                rid = self.engine.add_request(ids, p)
                outputs[rid] = RequestOutput(prompt if isinstance(prompt, str) else None, ids)
        except Exception:
            for rid in outputs:  # a bad prompt fails the call but leaves the engine clean
                self.engine.abort(rid)
            self.engine.step()
            raise
        for d in self.engine.run_to_completion():
            out = outputs[d.request_id]
            out.token_ids.extend(d.new_token_ids)
            out.text += d.text
            if d.logprobs:
                out.logprobs = (out.logprobs or []) + list(d.logprobs)
            if d.prompt_logprobs is not None:
                out.prompt_logprobs = list(d.prompt_logprobs)
            if d.finished:
                out.finish_reason, out.usage = d.finish_reason, d.usage
        return list(outputs.values())

    def chat(self, messages, params: SamplingParams | None = None) -> list[RequestOutput]:
        """messages: one conversation ([{"role", "content"}, ...]) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if self.tokenizer is None:
            raise InvalidRequestError("this checkpoint has no tokenizer, so chat is unavailable")
        return self.generate([self.tokenizer.encode_chat(c) for c in conversations], params)
