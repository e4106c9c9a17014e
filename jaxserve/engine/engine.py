"""Engine: the narrow interface serving code depends on. add_request / abort / step.

    plan = scheduler.schedule(); sampled = runner.execute(plan); scheduler.update(plan, sampled)

Host bookkeeping (scheduler, block manager, requests, detokenizers) never touches jax; the runner
is the one bridge to the device.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging

from jax.sharding import Mesh

from jaxserve.checkpoint import LoadedModel
from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.engine.request import Request, RequestStatus, Usage
from jaxserve.engine.runner import ModelRunner, RunnerOutput, SampledToken
from jaxserve.engine.scheduler import Scheduler
from jaxserve.errors import InvalidRequestError
from jaxserve.ops.backends import resolve_attention_backend
from jaxserve.parallel import check_engine_mesh, log_placement, num_shards, shard_params
from jaxserve.sampling_params import SamplingParams
from pallas_kernels.kv_quant import KVFormat, bytes_per_page, kv_format

log = logging.getLogger(__name__)
DEFAULT_KV_CACHE_MEMORY = 1 << 30


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None          # wins over kv_cache_memory when set
    kv_cache_memory: int | None = None    # bytes for KV pages per device; default 1 GiB
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512     # token budget per step (prefill chunks + decodes)
    max_model_len: int | None = None      # default: the model's context length
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"          # auto (the model dtype) | float32 | bfloat16 | fp8 | int8 | int4 | nvfp4
    attention_backend: str = "auto"       # auto (the platform's kernel; native on CPU) | xla | native | pallas


@dataclasses.dataclass(frozen=True)
class RequestDelta:
    """What one step added to one request."""
    request_id: str
    new_token_ids: tuple[int, ...]
    text: str                          # text completed by the new tokens (stop strings excluded)
    finished: bool
    finish_reason: str | None          # "stop" | "length" | "abort"
    usage: Usage
    logprobs: tuple[SampledToken, ...] | None = None
    prompt_logprobs: tuple[float | None, ...] | None = None  # with the first token: one per prompt token, first None
    queue_time: float | None = None    # on the finished delta: seconds from arrival to first scheduled


def kv_bytes_per_page(model: LoadedModel, page_size: int, fmt: KVFormat, mesh=None) -> int:
    """Real bytes of one page (all layers, keys and values) in format `fmt` on each device: a mesh
    that splits the kv heads splits every page."""
    cfg = model.config
    heads = cfg.num_kv_heads // num_shards("kv_heads", cfg, mesh)
    return bytes_per_page(fmt, cfg.num_layers, page_size, heads, cfg.head_dim)


class Engine:
    """mesh: None (one device) or a tensor-parallel jax Mesh with axis "tp" (jaxserve.parallel);
    the model's params are placed on it unless they already are."""

    def __init__(self, model: LoadedModel, config: EngineConfig = EngineConfig(), mesh: Mesh | None = None):
        if mesh is not None:
            check_engine_mesh(mesh)
            log_placement(model.config, mesh)
            model = shard_params(model, mesh)
        self.model, self.config, self.tokenizer, self.mesh = model, config, model.tokenizer, mesh
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.kv_format = kv_format(config.kv_cache_dtype, model.dtype)
        self.attention_impl = resolve_attention_backend(config.attention_backend)
        page_bytes = kv_bytes_per_page(model, config.page_size, self.kv_format, mesh)
        memory = config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
        num_pages = config.num_pages or max(2, memory // page_bytes)
        self.block_manager = BlockManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        log.info("KV cache: %s, page size %d, %d pages (%.1f MiB per device), at most %d cached tokens; attention: %s",
                 self.kv_format.name, config.page_size, num_pages, num_pages * page_bytes / 2**20,
                 self.max_cached_tokens, self.attention_impl)
        self.runner = ModelRunner(model, num_pages, config.page_size, config.max_num_seqs,
                                  config.max_num_batched_tokens, self.max_model_len, self.kv_format,
                                  self.attention_impl, mesh)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else ())
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._aborted: list[Request] = []
        self._prompt_logprobs: dict[str, dict[int, float]] = {}  # filled chunk by chunk, sent with the first token
        self._ids = itertools.count()

    @property
    def max_cached_tokens(self) -> int:
        return self.block_manager.num_usable_pages * self.block_manager.page_size

    @property
    def compile_count(self) -> int:
        return self.runner.compile_count

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._aborted)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0) -> str:
        """Validates and queues one request; raises InvalidRequestError (naming the field) if bad."""
        params = params or SamplingParams()
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError(f"priority must be an integer, got {priority!r}")
        ids = self._prompt_ids(prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens, more than the model context of "
                                      f"{self.max_model_len} minus one token to generate")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model context "
                f"of {self.max_model_len} tokens")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        request = Request(request_id, ids, params, self.eos_token_ids, priority=priority)
        self.scheduler.add_request(request)  # checks KV capacity and duplicate ids
        self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, ids, params.stop)
        return request_id

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("prompt: this checkpoint has no tokenizer, so pass token ids")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}), got {bad[0]!r}")
        return ids

    def abort(self, request_id: str) -> bool:
        request = self.scheduler.get_request(request_id)
        if request is None or not self.scheduler.abort(request_id):
            return False
        self.runner.release([request_id])
        self._aborted.append(request)
        return True

    def step(self) -> list[RequestDelta]:
        deltas = [self._delta(r, (), "", None) for r in self._aborted]
        self._aborted.clear()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return deltas
        out: RunnerOutput = self.runner.execute(plan)
        sampled = out.sampled
        for rid, scores in out.prompt_logprobs.items():
            self._prompt_logprobs.setdefault(rid, {}).update(scores)
        events = self.scheduler.update(plan, {rid: s.token_id for rid, s in sampled.items()})
        for request, token in events:
            detok = self._detokenizers[request.request_id]
            text = detok.add(token)
            if detok.stopped and not request.is_finished:
                self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED)
            if request.is_finished and not detok.stopped:
                text += detok.flush()
            deltas.append(self._delta(request, (token,), text, sampled[request.request_id]))
        return deltas

    def _delta(self, request: Request, tokens, text: str, sampled: SampledToken | None) -> RequestDelta:
        if request.is_finished:
            self.runner.release([request.request_id])
            self._detokenizers.pop(request.request_id, None)
        usage = Usage(request.num_prompt_tokens, len(request.output_token_ids), request.num_cached_tokens)
        logprobs = (sampled,) if sampled is not None and request.params.logprobs is not None else None
        queue_time = None
        if request.is_finished and request.first_scheduled_time is not None:
            queue_time = request.first_scheduled_time - request.arrival_time
        return RequestDelta(request.request_id, tuple(tokens), text, request.is_finished,
                            request.finish_reason, usage, logprobs, self._take_prompt_logprobs(request), queue_time)

    def _take_prompt_logprobs(self, request: Request):
        scores = self._prompt_logprobs.pop(request.request_id, None)
        if scores is None:
            return None
        return (None,) + tuple(scores.get(p) for p in range(1, request.num_prompt_tokens))
