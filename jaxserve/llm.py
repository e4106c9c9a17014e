"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(...)`."""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

from jaxserve.checkpoint import load_model
from jaxserve.checkpoint.registry import DEFAULT_MODEL
from jaxserve.engine.contiguous import ContiguousGenerator, RowState
from jaxserve.errors import InvalidRequestError
from jaxserve.sampling_params import SamplingParams

Prompt = Union[str, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop string or stop token) or "length"


def _as_prompt_list(prompts) -> list[Prompt]:
    """A single prompt (string or token-id list) or a list of them -> a list of prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(t, int) for t in prompts)):
        return [prompts]
    return list(prompts)


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "auto", max_batch_size: int = 32,
                 progress: bool = True):
        self.model = load_model(model, dtype=dtype, progress=progress)
        self.tokenizer = self.model.tokenizer
        self.config = self.model.config
        eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
        self.generator = ContiguousGenerator(self.model, eos, max_batch=max_batch_size)

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if not prompts:
            raise InvalidRequestError("prompts is empty")
        params = params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [self._prompt_ids(p) for p in prompts]
        for prompt_ids, p in zip(ids, params):
            self._check_length(prompt_ids, p)
        rows = self.generator.generate(ids, params, self._hit_stop_string)
        return [self._output(p, i, r) for p, i, r in zip(prompts, ids, rows)]

    def chat(self, messages, params: SamplingParams | None = None) -> list[RequestOutput]:
        """messages: one conversation ([{"role", "content"}, ...]) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if self.tokenizer is None:
            raise InvalidRequestError("this checkpoint has no tokenizer, so chat is unavailable")
        return self.generate([self.tokenizer.encode_chat(c) for c in conversations], params)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("this checkpoint has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.config.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}), got {bad[0]!r}")
        return ids

    def _check_length(self, ids: list[int], p: SamplingParams):
        context = self.config.max_position_embeddings
        if len(ids) >= context:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens, more than the model context of {context} "
                                      "minus one token to generate")
        if len(ids) + p.max_tokens > context:
            raise InvalidRequestError(f"max_tokens={p.max_tokens} plus the prompt's {len(ids)} tokens exceeds "
                                      f"the model context of {context}")

    def _text(self, row: RowState) -> str:
        return self.tokenizer.decode(row.tokens) if self.tokenizer else ""

    def _hit_stop_string(self, row: RowState) -> bool:
        return bool(row.params.stop) and any(s in self._text(row) for s in row.params.stop)

    def _output(self, prompt: Prompt, ids: list[int], row: RowState) -> RequestOutput:
        text = self._text(row)
        cuts = [text.index(s) for s in row.params.stop if s in text]
        if cuts:  # cut at the earliest stop string; it is not part of the answer
            text = text[:min(cuts)]
        return RequestOutput(prompt if isinstance(prompt, str) else None, ids, text, row.tokens,
                             row.finish_reason or "length")
