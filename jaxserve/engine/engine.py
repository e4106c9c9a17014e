"""Engine: the narrow interface servers and jobs depend on.

    add_request / abort / abort_all / step / has_unfinished / run_to_completion / info / stats

Inside, each step is the contract of jaxserve/core/plan.py:

    plan = scheduler.schedule(); output = runner.execute(plan); scheduler.update(plan, output)

Host bookkeeping (jaxserve/core: scheduler, block manager, requests, detokenizers) never touches
jax; the runner (jaxserve/runner) is the one bridge to the device. Nothing outside this package
reaches the scheduler, block manager, runner or model: they are the engine's own.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Callable, Iterator

import jax
from jax.sharding import Mesh

from jaxserve.checkpoint import LoadedModel
from jaxserve.core.block_manager import BlockManager
from jaxserve.core.detokenizer import IncrementalDetokenizer
from jaxserve.core.request import Request, RequestStatus
from jaxserve.core.scheduler import RequestUpdate, Scheduler
from jaxserve.engine.config import EngineConfig
from jaxserve.engine.handoff import Incoming, KVExport, Lease, LocalPages, RequestState
from jaxserve.engine.outputs import EngineInfo, EngineStats, RequestDelta
from jaxserve.errors import InvalidRequestError
from jaxserve.ops.backends import select_attention_backend
from jaxserve.ops.moe import grouped_impl
from jaxserve.parallel import check_engine_mesh, log_placement, num_shards, shard_params
from jaxserve.runner.runner import ModelRunner
from jaxserve.sampling_params import SamplingParams
from pallas_kernels.kv_formats import KVFormat, bytes_per_page, kv_format

log = logging.getLogger(__name__)


def kv_bytes_per_page(model: LoadedModel, page_size: int, fmt: KVFormat, mesh=None) -> int:
    """Real bytes of one page (all layers, keys and values) in format `fmt` on each device: a mesh
    that splits the kv heads splits every page."""
    cfg = model.config
    heads = cfg.num_kv_heads // num_shards("kv_heads", cfg, mesh)
    return bytes_per_page(fmt, cfg.num_layers, page_size, heads, cfg.head_dim)


class Engine:
    """mesh: None (one device) or the engine's jax Mesh (axes "tp", or "ep" and "tp"; jaxserve.parallel). Params should
    already be placed on it (load_model(..., mesh=...), or jaxserve.engine.load_engines); params
    placed elsewhere are put there by the same route."""

    def __init__(self, model: LoadedModel, config: EngineConfig = EngineConfig(), mesh: Mesh | None = None):
        model = model.with_router_options(**config.router_options)
        if mesh is not None:
            check_engine_mesh(mesh, model.config)
            log_placement(model.config, mesh)
            model = shard_params(model, mesh)
        self.model, self.config, self.tokenizer, self.mesh = model, config, model.tokenizer, mesh
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.kv_format = kv_format(config.kv_cache_dtype, model.dtype)
        self.backend = select_attention_backend(config.attention_backend, self.kv_format)
        page_bytes = kv_bytes_per_page(model, config.page_size, self.kv_format, mesh)
        num_pages = config.num_pages or max(2, config.kv_memory // page_bytes)
        self.block_manager = BlockManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        log.info("KV cache: %s, page size %d, %d pages (%.1f MiB per device), at most %d cached tokens; attention: %s",
                 self.kv_format.name, config.page_size, num_pages, num_pages * page_bytes / 2**20,
                 self.max_cached_tokens, self.backend.name)
        if model.config.num_experts:
            cfg = model.config
            log.info("MoE: %d experts, top-%d, grouped matmul %s%s", cfg.num_experts, cfg.num_experts_per_token,
                     grouped_impl(self.backend.name), "; expert skipping on" if cfg.skips_experts else "")
        self.runner = ModelRunner(model, num_pages, config.page_size, config.max_num_seqs,
                                  config.max_num_batched_tokens, self.max_model_len, self.kv_format,
                                  self.backend, mesh, config.kv_transfer_dtype)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else ())
        self._info = self._make_info()
        self._aborted: list[Request] = []
        self._ids = itertools.count()
        # Disaggregated serving. run_soon(fn): runs fn on this engine's thread (set by AsyncEngine;
        # None: at once, the caller being that thread). Leases end from any thread through it.
        self.run_soon: Callable[[Callable[[], object]], None] | None = None
        self._export_deadlines: dict[str, float] = {}  # exported request id -> lease expiry
        # Expiry guards against a decode side that died. In one process (DisaggPool) there is none:
        # every lease is ended by the pool or the decode engine, so the pool turns expiry off.
        self.export_leases_expire = True
        self._incoming: dict[str, Incoming] = {}
        self._transfers = dict(transfers_completed=0, transfer_failures=0, transfer_bytes=0,
                               transfer_seconds=0.0, exports_expired=0, exports=0, export_prefill_seconds=0.0,
                               imports_refused=0)

    # --- what servers and jobs see -----------------------------------------------------------------
    def info(self) -> EngineInfo:
        return self._info

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(bm.num_usable_pages, bm.num_free_pages, bm.num_cached_pages, sched.num_running,
                           sched.num_waiting, sched.prefix_cache_queries, sched.prefix_cache_hits,
                           sched.num_preemptions, self.runner.compile_count, len(sched.exported),
                           len(sched.receiving), **self._transfers)

    def prepare_transfers(self) -> None:
        """Compiles the KV page transfer programs now (a disaggregated deployment calls this at start)."""
        self.runner.compile_transfers()

    @property
    def kv_spec(self) -> str:
        """The KV pages' format digest: a prefill and a decode engine hand requests over only when equal."""
        return self.runner.pages.spec

    @property
    def max_cached_tokens(self) -> int:
        return self.block_manager.num_usable_pages * self.block_manager.page_size

    @property
    def compile_count(self) -> int:
        return self.runner.compile_count

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._aborted)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids, validated (text is tokenized); raises InvalidRequestError."""
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

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, export: bool = False) -> str:
        """Validates and queues one request; raises InvalidRequestError (naming the field) if bad.
        export: hand it over after its first token (a prefill engine; the delta carries a KVExport)."""
        params = params or SamplingParams()
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError(f"priority must be an integer, got {priority!r}")
        ids = self.encode_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens, more than the model context of "
                                      f"{self.max_model_len} minus one token to generate")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model context "
                f"of {self.max_model_len} tokens")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.stop)
        request = Request(request_id, ids, params, self.eos_token_ids, priority=priority, detokenizer=detokenizer,
                          export=export)
        self.scheduler.add_request(request)  # checks KV capacity and duplicate ids
        return request_id

    def abort(self, request_id: str) -> bool:
        """Ends a waiting or running request; its stream gets a final "abort" delta at the next step.
        False when the id is unknown or already finished."""
        request = self.scheduler.get_request(request_id)
        exported = request is not None and request.status is RequestStatus.EXPORTED
        if request is None or not self.scheduler.abort(request_id):
            return False
        self._export_deadlines.pop(request_id, None)
        self._end_import(request_id, received=False)
        if not exported:  # an exported request's stream already ended with its export
            self._aborted.append(request)
        return True

    def unfinished_request_ids(self) -> list[str]:
        """Every waiting or running request."""
        return self.scheduler.unfinished_ids()

    def abort_all(self) -> int:
        """Aborts every unfinished request; returns how many."""
        return sum(self.abort(rid) for rid in self.unfinished_request_ids())

    def step(self) -> list[RequestDelta]:
        """One step of every running request; the deltas it produced (aborted requests' final ones first)."""
        deltas = [self._delta(r, (), "") for r in self._aborted]
        self._aborted.clear()
        self._poll_imports()
        plan = self.scheduler.schedule()
        output = self.runner.execute(plan)
        for imp in plan.imports:
            self._end_import(imp.request_id, received=True)
        for rid in plan.preempted_ids:  # an import preempted on arrival recomputes: its pages go unused
            self._end_import(rid, received=False)
        deltas += [self._update_delta(u) for u in self.scheduler.update(plan, output)]
        if self.run_soon is None:  # on its own (no AsyncEngine thread checking on a timer)
            self.expire_exports()
        if plan.is_empty and self._incoming:
            time.sleep(0.001)  # only imports in flight: poll them without spinning a core
        return deltas

    # --- disaggregated serving ---------------------------------------------------------------------
    def release_export(self, request_id: str, received: bool = True) -> bool:
        """Frees an exported request's pinned pages (once; False if not exported or already freed)."""
        self._export_deadlines.pop(request_id, None)
        return self.scheduler.release_export(request_id)

    def import_request(self, export: KVExport) -> bool:
        """Takes over a request a prefill engine exported: reserves a seat and pages and starts
        fetching its KV. False when seats or pages are short (nothing changed: retry or go
        elsewhere). The request then decodes here as if prefilled here; if its pages do not arrive
        within kv_transfer_timeout (or the transfer fails) it is prefilled here instead."""
        if export.kv_spec != self.kv_spec:
            raise InvalidRequestError(f"KV pages differ between prefill ({export.kv_spec}) and decode "
                                      f"({self.kv_spec}): same model, kv cache dtype, page size and transfer format needed")
        request = self._imported_request(export.state)
        if not self.scheduler.add_import(request):
            self._transfers["imports_refused"] += 1
            return False
        try:
            arrays = export.pages.fetch(self.runner.pages.place)
        except Exception as e:  # noqa: BLE001 - the request recomputes; nothing is lost
            self._incoming[request.request_id] = Incoming(export, [], 0.0)
            self._abandon_import(request.request_id, f"{type(e).__name__}: {e}")
            return True
        self._incoming[request.request_id] = Incoming(export, arrays, time.monotonic() + self.config.kv_transfer_timeout)
        return True

    def _imported_request(self, s: RequestState) -> Request:
        prompt = list(s.prompt_token_ids)
        now = time.monotonic()
        request = Request(s.request_id, prompt, s.params, self.eos_token_ids, priority=s.priority,
                          arrival_time=now - s.age, detokenizer=IncrementalDetokenizer(self.tokenizer, prompt, s.params.stop),
                          sampling_seed=s.sampling_seed, num_cached_tokens=s.num_cached_tokens)
        request.first_scheduled_time = request.arrival_time + s.queue_time
        for token in s.output_token_ids:  # their text went out from the prefill side
            request.append_token(token)
        return request

    def _export(self, request: Request) -> KVExport:
        rid, bm = request.request_id, self.block_manager
        pages = bm.page_table(rid)[:bm.pages_needed(request.num_computed_tokens)]
        arrays, _ = self.runner.export_pages(pages)
        now = time.monotonic()
        state = RequestState(rid, tuple(request.prompt_token_ids), tuple(request.output_token_ids), request.params,
                             request.priority, request.sampling_seed, request.num_cached_tokens,
                             request.first_scheduled_time - request.arrival_time, now - request.arrival_time, len(pages))
        self._export_deadlines[rid] = now + self.config.kv_export_lease_timeout
        self._transfers["exports"] += 1
        self._transfers["export_prefill_seconds"] += now - request.first_scheduled_time
        return KVExport(state, self.kv_spec, LocalPages(tuple(arrays), sum(a.nbytes for a in arrays)),
                        Lease(rid, self._lease_ended), prefill_time=now - request.first_scheduled_time)

    def _lease_ended(self, request_id: str, received: bool) -> None:
        """From any thread: the pages go back on this engine's thread."""
        release = lambda: self.release_export(request_id, received)  # noqa: E731
        release() if self.run_soon is None else self.run_soon(release)

    def expire_exports(self) -> None:
        if not self.export_leases_expire:
            return
        now = time.monotonic()
        for rid in [r for r, deadline in self._export_deadlines.items() if deadline < now]:
            log.warning("export of %s: nobody took or abandoned its pages in %.0f s; freeing them", rid,
                        self.config.kv_export_lease_timeout)
            self._transfers["exports_expired"] += 1
            self.release_export(rid, received=False)

    def _poll_imports(self) -> None:
        for rid, inc in list(self._incoming.items()):
            if inc.arrived:
                continue
            status = inc.poll()
            if status == "ready":
                inc.arrived = True
                self.runner.stage_import(rid, inc.arrays)
                self.scheduler.mark_arrived(rid)
            elif status != "waiting":
                self._abandon_import(rid, "transfer failed" if status == "failed" else
                                     f"its KV pages did not arrive within {self.config.kv_transfer_timeout:.1f} s")

    def _abandon_import(self, request_id: str, why: str) -> None:
        log.warning("import of %s: %s; prefilling it here instead", request_id, why)
        self._transfers["transfer_failures"] += 1
        if request_id in self._incoming:
            self._incoming[request_id].export.pages.failed()
        self.scheduler.fall_back_to_recompute(request_id)
        self._end_import(request_id, received=False)

    def _end_import(self, request_id: str, received: bool) -> None:
        inc = self._incoming.pop(request_id, None)
        if inc is None:
            return
        self.runner.drop_import(request_id)
        inc.export.lease.end(received)
        if received:
            t = self._transfers
            t["transfers_completed"] += 1
            t["transfer_bytes"] += inc.export.pages.nbytes
            t["transfer_seconds"] += time.monotonic() - inc.started

    def run_to_completion(self) -> Iterator[RequestDelta]:
        """Steps until no request is left, yielding every delta: the offline loop (LLM, jobs)."""
        while self.has_unfinished():
            yield from self.step()

    # --- inside ------------------------------------------------------------------------------------
    def _update_delta(self, update: RequestUpdate) -> RequestDelta:
        request = update.request
        logprobs = update.sampled if request.params.logprobs is not None else None
        delta = self._delta(request, tuple(s.token_id for s in update.sampled), update.text, logprobs)
        if request.status is RequestStatus.EXPORTED:
            delta = dataclasses.replace(delta, export=self._export(request))
        return delta

    def _delta(self, request: Request, tokens, text: str, logprobs=None) -> RequestDelta:
        usage = request.usage
        queue_time = None
        if request.is_finished and request.first_scheduled_time is not None:
            queue_time = request.first_scheduled_time - request.arrival_time
        return RequestDelta(request.request_id, tuple(tokens), text, request.is_finished, request.finish_reason,
                            usage, logprobs, request.take_prompt_logprobs(), queue_time)

    def _make_info(self) -> EngineInfo:
        tok, mesh = self.tokenizer, self.mesh
        devices = tuple(d.id for d in mesh.devices.flat) if mesh is not None else (jax.devices()[0].id,)
        return EngineInfo(
            model=self.model.name, model_config=self.model.config, dtype=str(self.model.dtype),
            max_model_len=self.max_model_len, eos_token_ids=tuple(sorted(self.eos_token_ids)),
            has_tokenizer=tok is not None, has_chat_template=bool(tok and tok.chat_template),
            platform=jax.default_backend(), attention_backend=self.backend.name,
            kv_cache_dtype=self.kv_format.name, page_size=self.config.page_size,
            num_pages=self.block_manager.num_usable_pages, max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            mesh=tuple(mesh.shape.items()) if mesh is not None else (), devices=devices)
