"""Perplexity of a text through the engine (like llama.cpp's perplexity tool).

The tokens are cut into windows of `context` tokens; each window is one request whose prompt is
prefilled in chunks of the engine's token budget, so later chunks attend to KV already in the
paged cache, in the engine's KV format. Every token of a window but the first is scored:
perplexity = exp(-mean log p(token | window tokens before it)).
"""
from __future__ import annotations

import dataclasses
import math
import sys

from tqdm import tqdm

from jaxserve.engine import Engine
from jaxserve.errors import InvalidRequestError
from jaxserve.sampling_params import SamplingParams

_SCORE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=True)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int          # scored tokens
    nll: float           # mean negative log-likelihood per scored token (nats)
    windows: int
    context: int
    kv_cache_dtype: str


def windows_of(ids: list[int], context: int) -> list[list[int]]:
    """Consecutive windows of `context` tokens; a last window of a single token is dropped (it
    scores nothing)."""
    return [ids[i:i + context] for i in range(0, len(ids), context) if len(ids[i:i + context]) > 1]


def perplexity(engine: Engine, ids: list[int], context: int, progress: bool | None = None) -> PerplexityResult:
    if context < 2:
        raise InvalidRequestError(f"context must be >= 2 tokens, got {context}")
    info = engine.info()
    if context >= info.max_model_len:
        raise InvalidRequestError(f"context ({context}) must be below the model context of {info.max_model_len}")
    windows = windows_of(ids, context)
    if not windows:
        raise InvalidRequestError(f"the text has {len(ids)} token(s); at least 2 are needed")
    pending = {engine.add_request(w, _SCORE) for w in windows}
    total, count = 0.0, 0
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=sum(len(w) - 1 for w in windows), unit="tok", disable=not show, desc="perplexity") as bar:
        for d in engine.run_to_completion():
            if d.request_id not in pending:
                continue  # another caller's request on the same engine
            if d.prompt_logprobs is not None:
                scores = d.prompt_logprobs[1:]
                total += sum(scores)
                count += len(scores)
                bar.update(len(scores))
            if d.finished:
                pending.discard(d.request_id)
                if not pending:
                    break
    nll = -total / count
    return PerplexityResult(math.exp(nll), count, nll, len(windows), context, info.kv_cache_dtype)
