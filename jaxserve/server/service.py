"""The jaxserve.v1.JaxServe servicer (grpc.aio): requests in, engine deltas out as a stream.

Each Generate call holds its request inside `pool.generate(...)`: whatever ends the call early
(client cancel or disconnect, deadline, server drain) leaves that block and aborts the request,
which frees its KV pages. Errors map to gRPC codes and never reach other requests. Every refused
request is counted (`request_failure{code}`) and logged at a bounded rate; client-supplied strings
reach the log escaped and bounded (logsafe.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import grpc

from jaxserve import __version__
from jaxserve.engine.pool import DuplicateRequestError, EnginePool, QueueFullError
from jaxserve.errors import InvalidRequestError
from jaxserve.server import protocol
from jaxserve.server.logsafe import RateLimitedLog, loggable
from jaxserve.server.metrics import ServerMetrics
from jaxserve.v1 import jaxserve_pb2 as pb
from jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
# Our own timer ends a request this long before the gRPC deadline, so the server, not a race with the
# client's cancellation, decides that the deadline passed (and says DEADLINE_EXCEEDED).
DEADLINE_MARGIN_S = 0.1
# A cancellation this close to the deadline is the client's deadline firing (its clock starts before
# the request reaches us, by network and queueing time), not a client that gave up.
DEADLINE_SLACK_S, DEADLINE_SLACK_FRACTION = 0.5, 0.02


@dataclasses.dataclass(frozen=True)
class ServingInfo:
    """Facts about the deployment that GetModelInfo / GetServerInfo report."""
    model_name: str
    mesh: str
    num_devices: int
    max_queued_requests: int


class _RequestClock:
    """Server-side timings of one request (monotonic seconds since arrival) and its deadline."""

    def __init__(self, metrics: ServerMetrics, time_remaining: float | None):
        self.metrics, self.arrival = metrics, time.monotonic()
        self.first_token = self.last_token = None
        self.timeout = time_remaining  # None: no deadline

    def on_tokens(self) -> None:
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.metrics.itl.observe(now - self.last_token)
        self.last_token = now

    def timings(self, queue_time: float | None) -> pb.Timings:
        now = time.monotonic()
        return pb.Timings(queue_time_s=queue_time or 0.0, e2e_s=now - self.arrival,
                          ttft_s=(self.first_token or now) - self.arrival)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.arrival

    def own_timeout(self) -> float | None:
        return None if self.timeout is None else max(0.0, self.timeout - DEADLINE_MARGIN_S)

    def deadline_passed(self) -> bool:
        """Whether a cancellation now is the deadline's doing."""
        if self.timeout is None:
            return False
        slack = max(DEADLINE_SLACK_S, DEADLINE_SLACK_FRACTION * self.timeout)
        return self.elapsed >= self.timeout - slack


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class JaxServeService(pb_grpc.JaxServeServicer):
    def __init__(self, pool: EnginePool, info: ServingInfo, metrics: ServerMetrics):
        self.pool, self.info, self.metrics = pool, info, metrics
        self.engine_info = pool.info()  # model facts are the same on every replica
        self.tokenizer = pool.tokenizer
        self.refusals = RateLimitedLog(log)
        self.draining = False
        self.started = time.monotonic()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        clock = _RequestClock(self.metrics, context.time_remaining())
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        try:
            if self.draining:
                raise _Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            prompt = protocol.prompt_of(request, self.tokenizer)
            params = protocol.sampling_params(request.sampling)
            async with asyncio.timeout(clock.own_timeout()):
                async with self.pool.generate(prompt, params, rid, request.priority) as deltas:
                    async for delta in deltas:
                        yield self._response(delta, clock)
        except InvalidRequestError as e:
            await self.refuse(context, rid, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except DuplicateRequestError as e:
            await self.refuse(context, rid, grpc.StatusCode.ALREADY_EXISTS, str(e))
        except QueueFullError as e:
            await self.refuse(context, rid, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except _Refused as e:
            await self.refuse(context, rid, e.code, e.message)
        except TimeoutError:
            self.metrics.record_failure(grpc.StatusCode.DEADLINE_EXCEEDED.name)
            log.info("request %s deadline exceeded after %.3f s; aborted", loggable(rid), clock.elapsed)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"deadline exceeded after {clock.elapsed:.3f} s; request aborted")
        except asyncio.CancelledError:
            code = grpc.StatusCode.DEADLINE_EXCEEDED if clock.deadline_passed() else grpc.StatusCode.CANCELLED
            self.metrics.record_failure(code.name)
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                log.info("request %s deadline exceeded after %.3f s; aborted", loggable(rid), clock.elapsed)
            else:
                log.info("request %s cancelled by the client after %.3f s; aborted", loggable(rid), clock.elapsed)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - an engine failure fails this request only
            log.exception("request %s failed", loggable(rid))
            self.metrics.record_failure(grpc.StatusCode.INTERNAL.name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    def _response(self, delta, clock: _RequestClock) -> pb.GenerateResponse:
        if delta.new_token_ids:
            clock.on_tokens()
        timings = None
        if delta.finished:
            timings = clock.timings(delta.queue_time)
            self.metrics.record_finish(delta.usage, delta.finish_reason, timings.e2e_s, delta.queue_time)
            log.info("request %s finished (%s): %d prompt (%d cached) + %d tokens, ttft %.3f s, e2e %.3f s",
                     loggable(delta.request_id), delta.finish_reason, delta.usage.prompt_tokens,
                     delta.usage.cached_prompt_tokens, delta.usage.completion_tokens, timings.ttft_s, timings.e2e_s)
        return protocol.generate_response(delta, timings)

    async def refuse(self, context, rid: str | None, code: grpc.StatusCode, message: str,
                     what: str = "undecodable request"):
        """Counts, logs (rate-limited, escaped) and answers a refused request; `what` names a
        request that has no id."""
        self.metrics.record_failure(code.name)
        who = what if rid is None else f"request {loggable(rid)}"
        self.refusals.info("%s refused: %s %s", who, code.name, loggable(message))
        await context.abort(code, message)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        tok = await self._tokenizer(context)
        try:
            if request.WhichOneof("input") == "chat":
                ids = tok.encode_chat(protocol.chat_messages(request.chat))
            else:
                ids = tok.encode(request.text, add_special_tokens=request.add_special_tokens)
        except ValueError as e:
            await self.refuse(context, None, grpc.StatusCode.INVALID_ARGUMENT, str(e), "tokenize request")
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        tok = await self._tokenizer(context)
        vocab = self.engine_info.model_config.vocab_size
        bad = [t for t in request.token_ids if not 0 <= t < vocab]
        if bad:
            await self.refuse(context, None, grpc.StatusCode.INVALID_ARGUMENT,
                              f"token_ids must be in [0, {vocab}), got {bad[0]}", "detokenize request")
        return pb.DetokenizeResponse(text=tok.decode(list(request.token_ids), request.skip_special_tokens))

    async def _tokenizer(self, context):
        if self.tokenizer is None:
            await self.refuse(context, None, grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer",
                              "tokenizer request")
        return self.tokenizer

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return protocol.model_info(self.info.model_name, self.engine_info)

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        stats, info = await self.pool.stats(), self.engine_info
        return pb.ServerInfo(
            version=__version__, platform=info.platform, attention_backend=info.attention_backend,
            mesh=self.info.mesh, num_devices=self.info.num_devices, kv_cache_dtype=info.kv_cache_dtype,
            page_size=info.page_size, pages_total=stats.pages_total, pages_free=stats.pages_free,
            running_requests=stats.running, waiting_requests=stats.waiting, max_num_seqs=info.max_num_seqs,
            max_queued_requests=self.info.max_queued_requests, uptime_s=time.monotonic() - self.started,
            draining=self.draining, role=stats.role, exports_pinned=stats.exports_pinned,
            imports_in_flight=stats.imports_in_flight, transfers_completed=stats.transfers_completed,
            transfer_failures=stats.transfer_failures, transfer_bytes=stats.transfer_bytes,
            transfer_seconds=stats.transfer_seconds, exports_expired=stats.exports_expired,
            imports_refused=stats.imports_refused)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        aborted = await self.pool.abort(request.request_id)
        log.info("abort %s: %s", loggable(request.request_id), "aborted" if aborted else "not in flight")
        return pb.AbortResponse(aborted=aborted)
