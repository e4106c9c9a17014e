"""`jaxserve serve`: the engines, the gRPC server (JaxServe + health + reflection), metrics, and a
graceful stop.

SIGTERM / SIGINT: health turns NOT_SERVING, new Generate calls get UNAVAILABLE, in-flight requests
run to completion for up to `drain_timeout` seconds, then whatever is left is aborted and the
process exits.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.engine.pool import EnginePool
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.service import JaxServeService, ServingInfo
from jaxserve.v1 import jaxserve_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JaxServe"].full_name  # jaxserve.v1.JaxServe
MAX_MESSAGE_BYTES = 64 << 20  # long prompts as token ids, prompt logprobs of long texts


class _Malformed:
    """What the lenient deserializer returns for bytes that are not the expected message."""

    def __init__(self, message_type: str, error: Exception):
        self.text = f"request is not a valid {message_type} ({error})"


def _lenient_parser(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, invalid UTF-8 in strings, ...
            return _Malformed(message_cls.DESCRIPTOR.full_name, e)
    return parse


def _guarded(service: JaxServeService, method, streaming: bool):
    """Answers INVALID_ARGUMENT for undecodable requests (grpc itself would say INTERNAL), counted
    and logged like every other refusal."""
    if streaming:
        async def stream(request, context):
            if isinstance(request, _Malformed):
                await service.refuse(context, None, grpc.StatusCode.INVALID_ARGUMENT, request.text)
            async for item in method(request, context):
                yield item
        return stream

    async def unary(request, context):
        if isinstance(request, _Malformed):
            await service.refuse(context, None, grpc.StatusCode.INVALID_ARGUMENT, request.text)
        return await method(request, context)
    return unary


def register_service(servicer: JaxServeService, server) -> None:
    """Adds every JaxServe method (from the proto descriptor) with lenient request parsing."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["JaxServe"].methods:
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(_guarded(servicer, getattr(servicer, m.name), m.server_streaming),
                                request_deserializer=_lenient_parser(getattr(pb, m.input_type.name)),
                                response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None   # None: no metrics endpoint
    max_queued_requests: int = 1024   # waiting requests beyond the running batch; more -> RESOURCE_EXHAUSTED
    drain_timeout: float = 30.0       # seconds in-flight requests get after SIGTERM


class Server:
    def __init__(self, pool: EnginePool, info: ServingInfo, config: ServerConfig):
        self.pool, self.config = pool, config
        self.metrics = ServerMetrics(pool, info.model_name)
        self.service = JaxServeService(pool, info, self.metrics)
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                             ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                             ("grpc.so_reuseport", 0),
                                             # decode servers keep their connections to prefill servers alive
                                             ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                                             ("grpc.keepalive_permit_without_calls", 1)])
        register_service(self.service, self.grpc)
        self.handoff = getattr(pool, "handoff", None)  # a prefill server's KVHandoff service (jaxserve.disagg.remote)
        if self.handoff is not None:
            self.handoff.register(self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.address = f"{config.host}:{config.port}"
        self.port = self.grpc.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address} (port in use or bad host?)")
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Serves until SIGTERM/SIGINT (or `request_stop()`), then drains and returns."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        metrics_server = None
        if self.config.metrics_port is not None:
            metrics_server = self.metrics.serve(self.config.metrics_port, self.config.host)
        await self.grpc.start()
        await self.pool.start()
        if self.handoff is not None:
            await self.handoff.start()
        for name in (SERVICE_NAME, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s (metrics: %s)", SERVICE_NAME, f"{self.config.host}:{self.port}",
                 f"http://{self.config.host}:{self.config.metrics_port}/metrics" if metrics_server else "off")
        await self._stop.wait()
        await self._drain()
        if metrics_server is not None:
            metrics_server.shutdown()

    def request_stop(self, reason: str = "stop requested") -> None:
        if not self._stop.is_set():
            log.info("%s: stopping intake, draining %d in-flight requests (up to %.0f s)",
                     reason, self.pool.in_flight, self.config.drain_timeout)
            self.service.draining = True
            if self.handoff is not None:
                self.handoff.draining = True
            self._stop.set()

    async def _drain(self) -> None:
        """New Generate calls already get UNAVAILABLE (service.draining); wait for the in-flight ones,
        then stop gRPC, which cancels (and so aborts) whatever is still running."""
        await self.health.enter_graceful_shutdown()
        start = asyncio.get_running_loop().time()
        deadline = start + self.config.drain_timeout
        while self.pool.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        left = self.pool.in_flight
        await self.grpc.stop(grace=1.0)
        self.pool.shutdown()
        self.service.refusals.flush()
        log.info("stopped after draining for %.1f s; %d requests aborted at the drain deadline",
                 asyncio.get_running_loop().time() - start, left)


async def serve(pool: EnginePool, info: ServingInfo, config: ServerConfig) -> None:
    server = Server(pool, info, config)
    await server.run()
