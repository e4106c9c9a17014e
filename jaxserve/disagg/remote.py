"""Prefill and decode in separate server processes: `jaxserve serve --role prefill` and `jaxserve
serve --role decode --prefill-servers HOST:PORT[,...]`. Clients talk to the decode server only.

Why the decode server is the front door and pulls from any number of prefill servers: a request
spends most of its life decoding, so the server holding its stream is the decode server; prefill
servers are then stateless workers the decode server picks per prompt (fewest in flight), which can
be added, restarted or lost without losing a request: when none answers, or a transfer fails, the
decode server prefills the prompt itself.

The two roles share no jax.distributed runtime. Each server is its own process with its own devices
(a role spanning hosts would use jax.distributed among its own processes); the pages travel with
jax.experimental.transfer (wire.py), which needs none. One shared runtime would tie the two roles'
lives together (a dead process stalls the other's collectives and cannot rejoin), while the issue's
faults ask for a decode server killed and restarted under a live prefill server. The pages travel
as single-device arrays, validated against the offered specs before pulling, then placed on the
decode engine's own layout: no pull ever targets a sharding different from its source's, the case
that silently corrupts data.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from typing import AsyncIterator

import grpc

from jaxserve.core.plan import SampledToken
from jaxserve.disagg.pool import DecodeFront
from jaxserve.disagg.wire import KVReceiver, KVSender, OfferLimitError, WireSpec, new_transfer_id
from jaxserve.engine.engine import Engine
from jaxserve.engine.handoff import KVExport, Lease, RequestState
from jaxserve.engine.outputs import RequestDelta
from jaxserve.engine.pool import DuplicateRequestError, EnginePool, QueueFullError
from jaxserve.errors import InvalidRequestError
from jaxserve.server import protocol
from jaxserve.server.logsafe import loggable
from jaxserve.usage import Usage
from jaxserve.v1 import jaxserve_pb2 as pb
from jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
CONNECT_RETRY_S = 2.0
EXPIRY_CHECK_S = 1.0
# A prefill server that vanishes without closing its connections (a partition, a frozen host) is
# noticed within keepalive time + timeout, and the request is prefilled on the decode server.
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


@dataclasses.dataclass(frozen=True)
class RemotePages:
    """Pages offered by a prefill server: fetching pulls them (single-device) and places them."""
    address: str
    transfer_id: int
    specs: tuple[WireSpec, ...]
    receiver: KVReceiver
    nbytes: int

    def fetch(self, place):
        return place(self.receiver.pull(self.address, self.transfer_id, list(self.specs)))

    def failed(self) -> None:
        self.receiver.disconnect(self.address)  # a connection whose sender died stays broken


class KVHandoffService(pb_grpc.KVHandoffServicer):
    """The prefill server's side: runs prompts with export and offers their pages."""

    def __init__(self, pool: EnginePool, sender: KVSender, model_name: str, lease_timeout: float):
        self.pool, self.sender, self.model_name = pool, sender, model_name
        self.kv_spec = pool.kv_spec
        self._leases: dict[int, tuple[Lease, float]] = {}  # transfer id -> (lease, expiry)
        self._lease_timeout = lease_timeout
        self.draining = False  # set by the server's drain: no new prompts
        self._expiry: asyncio.Task | None = None

    def register(self, server) -> None:
        pb_grpc.add_KVHandoffServicer_to_server(self, server)

    async def start(self) -> None:
        """Expires unreleased offers on a timer, not only when the next prompt comes."""
        async def expire_forever():
            while True:
                await asyncio.sleep(EXPIRY_CHECK_S)
                self._expire()
                self.sender.expire()
        self._expiry = asyncio.create_task(expire_forever())

    async def Connect(self, request, context):
        return pb.ConnectResponse(kv_spec=self.kv_spec, model=self.model_name, transfer_address=self.sender.address)

    async def Prefill(self, request: pb.PrefillRequest, context):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the prefill server is shutting down")
        last, offered = None, False
        try:
            params = protocol.sampling_params(request.sampling)
            async with self.pool.generate(list(request.prompt_token_ids), params, request.request_id,
                                          request.priority, export=True) as deltas:
                async for last in deltas:
                    pass
            first = protocol.generate_response(dataclasses.replace(last, export=None), None)
            if last.export is None:
                return pb.PrefillResponse(first=first, exported=False)
            reply = self._offer(last.export, first)
            offered = True
            return reply
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except DuplicateRequestError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except OfferLimitError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        finally:
            # Cancelled (or failed) after the export and before the offer: nobody will ever pull it.
            if last is not None and last.export is not None and not offered:
                last.export.lease.end(received=False)

    def _offer(self, export: KVExport, first) -> pb.PrefillResponse:
        """Offers the pages for pulling (OfferLimitError when too many are outstanding)."""
        self._expire()
        tid = new_transfer_id()
        specs = self.sender.offer(tid, list(export.pages.arrays))
        self._leases[tid] = (export.lease, time.monotonic() + self._lease_timeout)
        s = export.state
        return pb.PrefillResponse(
            first=first, exported=True, transfer_id=tid, sampling_seed=s.sampling_seed,
            num_cached_tokens=s.num_cached_tokens, queue_time_s=s.queue_time, age_s=s.age,
            prefill_time_s=export.prefill_time, num_pages=s.num_pages, nbytes=export.pages.nbytes,
            transfer_address=self.sender.address, kv_spec=self.kv_spec,
            arrays=[pb.WireArray(shape=w.shape, dtype=w.dtype, num_shards=w.num_shards) for w in specs])

    async def Release(self, request: pb.ReleaseRequest, context):
        entry = self._leases.pop(request.transfer_id, None)
        self.sender.release(request.transfer_id)
        released = entry is not None and entry[0].end(request.received)
        return pb.ReleaseResponse(released=released)

    def _expire(self) -> None:
        """Offers nobody released within the lease timeout (a decode server that died): the engine
        frees their pages itself; the arrays on offer go here."""
        now = time.monotonic()
        for tid in [t for t, (_, expiry) in self._leases.items() if expiry < now]:
            lease, _ = self._leases.pop(tid)
            self.sender.release(tid)
            lease.end(received=False)


@dataclasses.dataclass
class _PrefillServer:
    address: str
    channel: grpc.aio.Channel | None = None
    stub: pb_grpc.KVHandoffStub | None = None
    transfer_address: str | None = None  # set once connected with a matching KV spec
    in_flight: int = 0
    connecting: bool = False


class RemotePrefillPool(DecodeFront):
    """The decode server's pool: decode engines here, prompts prefilled by the prefill servers."""
    role = "decode"

    def __init__(self, decode: list[Engine], prefill_servers: list[str], max_queued_requests: int,
                 transfer_host: str = "127.0.0.1"):
        super().__init__(decode, max_queued_requests)
        self.kv_spec = decode[0].kv_spec
        self.receiver = KVReceiver(host=transfer_host)
        self.servers = [_PrefillServer(a) for a in prefill_servers]
        self._calls: dict[str, grpc.aio.Call] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for server in self.servers:
            server.channel = grpc.aio.insecure_channel(server.address, options=KEEPALIVE_OPTIONS)
            server.stub = pb_grpc.KVHandoffStub(server.channel)
            self._reconnect(server)

    def _reconnect(self, server: _PrefillServer) -> None:
        """One connecting task per server at a time."""
        server.transfer_address = None
        if not server.connecting:
            server.connecting = True
            self._tasks = [t for t in self._tasks if not t.done()]
            self._tasks.append(asyncio.create_task(self._connect(server)))

    async def _connect(self, server: _PrefillServer) -> None:
        """Connects (retrying until it answers) and checks the KV layouts agree; a server whose
        pages differ is not used (checked again every minute: it may restart with other options)."""
        try:
            await self._connect_until_matched(server)
        finally:
            server.connecting = False

    async def _connect_until_matched(self, server: _PrefillServer) -> None:
        while server.transfer_address is None:
            try:
                reply = await server.stub.Connect(pb.ConnectRequest(kv_spec=self.kv_spec), timeout=5.0)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            if reply.kv_spec != self.kv_spec:
                log.error("prefill server %s has KV pages %s, this decode server %s: not using it", server.address,
                          reply.kv_spec, self.kv_spec)
                await asyncio.sleep(30 * CONNECT_RETRY_S)
                continue
            server.transfer_address = reply.transfer_address
            log.info("connected to prefill server %s (KV transfer from %s)", server.address, reply.transfer_address)

    def _pick(self) -> _PrefillServer | None:
        ready = [s for s in self.servers if s.transfer_address is not None]
        return min(ready, key=lambda s: s.in_flight) if ready else None

    async def _prefill(self, prompt, params, rid: str, priority: int) -> AsyncIterator[RequestDelta]:
        server = self._pick()
        ids = self.decode[0].engine.encode_prompt(prompt)
        reply = None if server is None else await self._remote_prefill(server, ids, params, rid, priority)
        if rid in self._aborted:
            if reply is not None and reply.exported:  # aborted as its answer came back: give the pages back
                self._release_soon(server, reply.transfer_id, received=False)
            yield RequestDelta(rid, (), "", True, "abort", Usage(len(ids), 0, 0))
            return
        if reply is None:  # no prefill server answered: prefill here
            async for delta in self._local(ids, params, rid, priority):
                yield delta
            return
        if reply.exported and reply.kv_spec != self.kv_spec:  # a server restarted with other options
            log.error("prefill server %s now sends KV pages %s (here %s); not using it", server.address,
                      reply.kv_spec, self.kv_spec)
            self._release_soon(server, reply.transfer_id, received=False)
            self._reconnect(server)
            async for delta in self._local(ids, params, rid, priority):
                yield delta
            return
        delta = _delta_of(reply.first, rid)
        if reply.exported:
            delta = dataclasses.replace(delta, export=self._export_of(server, reply, ids, params, rid, priority))
        yield delta

    async def _remote_prefill(self, server, ids, params, rid, priority) -> pb.PrefillResponse | None:
        # The prefill server's own id for it: unique there even when clients reuse ids or several
        # decode servers share it (an exported request keeps its id until its pages are released).
        request = pb.PrefillRequest(request_id=f"{rid[:64]}@{secrets.token_hex(8)}", prompt_token_ids=ids, sampling=protocol.sampling_message(params),
                                    priority=priority)
        server.in_flight += 1
        call = server.stub.Prefill(request)
        self._calls[rid] = call
        try:
            return await call
        except asyncio.CancelledError:
            if rid in self._aborted:
                return None
            raise
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(e.details()) from None
            if e.code() == grpc.StatusCode.CANCELLED and rid in self._aborted:
                return None
            log.warning("prefill server %s failed %s (%s); prefilling it here", server.address, loggable(rid),
                        e.code().name)
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self._reconnect(server)
            return None
        finally:
            server.in_flight -= 1
            self._calls.pop(rid, None)

    async def _local(self, ids, params, rid, priority) -> AsyncIterator[RequestDelta]:
        index = min(range(len(self.decode)), key=lambda i: self._load("decode", i))
        self._where[rid] = ("decode", index)
        async for delta in self.decode[index].generate(ids, params, rid, priority):
            yield delta

    def _export_of(self, server, reply, ids, params, rid, priority) -> KVExport:
        usage = reply.first.complete.usage if reply.first.HasField("complete") else None
        state = RequestState(rid, tuple(ids), tuple(reply.first.token_ids), params, priority, reply.sampling_seed,
                             reply.num_cached_tokens if usage is None else usage.cached_prompt_tokens,
                             reply.queue_time_s, reply.age_s, reply.num_pages)
        specs = tuple(WireSpec(tuple(a.shape), a.dtype, a.num_shards) for a in reply.arrays)
        pages = RemotePages(reply.transfer_address, reply.transfer_id, specs, self.receiver, reply.nbytes)
        lease = Lease(rid, lambda _rid, received: self._release_soon(server, reply.transfer_id, received))
        return KVExport(state, self.kv_spec, pages, lease, prefill_time=reply.prefill_time_s)

    def _release_soon(self, server: _PrefillServer, transfer_id: int, received: bool) -> None:
        """From any thread (a decode engine's, usually): tell the prefill server, without waiting."""
        async def release():
            try:
                await server.stub.Release(pb.ReleaseRequest(transfer_id=transfer_id, received=received), timeout=10.0)
            except grpc.aio.AioRpcError as e:  # it expires them itself
                log.info("release of transfer %d on %s failed: %s", transfer_id, server.address, e.code().name)
        try:
            asyncio.run_coroutine_threadsafe(release(), self._loop)
        except (RuntimeError, TypeError):  # the loop is closed (shutting down): the lease expires there
            log.info("release of transfer %d on %s not sent (shutting down)", transfer_id, server.address)

    async def _abort_prefill(self, rid: str, index: int | None) -> bool:
        call = self._calls.get(rid)
        return call is not None and call.cancel()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        super().shutdown(timeout)
        for task in self._tasks:
            task.cancel()
        self.receiver.close()


def _delta_of(msg: pb.GenerateResponse, rid: str) -> RequestDelta:
    logprobs = tuple(SampledToken(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
                     for lp in msg.logprobs) or None
    prompt_logprobs = (None,) + tuple(msg.prompt_logprobs) if msg.prompt_logprobs else None
    finished = msg.HasField("complete")
    reason = {v: k for k, v in protocol.FINISH_REASONS.items()}.get(msg.complete.finish_reason) if finished else None
    u = msg.complete.usage
    return RequestDelta(rid, tuple(msg.token_ids), msg.text, finished, reason,
                        Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens), logprobs,
                        prompt_logprobs)
