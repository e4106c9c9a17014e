"""Python client for a jaxserve gRPC server (`jaxserve serve`).

    from jaxserve.client import Client
    with Client("127.0.0.1:50051") as client:
        out = client.generate("The capital of France is", max_tokens=16, temperature=0)
        print(out.text, out.token_ids, out.finish_reason, out.usage)
        for delta in client.stream("Once upon a time", max_tokens=64):
            print(delta.text, end="", flush=True)

`AsyncClient` has the same methods as coroutines / async iterators. Failures raise
`JaxServeError` with the gRPC status `.code` and the server's `.message`.
"""
from __future__ import annotations

from typing import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve.client.messages import (CHANNEL_OPTIONS, HEALTH_STATUS, Delta, JaxServeError, Result, Timings, Usage,
                                      delta_of, error_from, generate_request, tokenize_request)
from jaxserve.v1 import jaxserve_pb2 as pb
from jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "Client", "Delta", "JaxServeError", "Result", "Timings", "Usage"]


class Client:
    """Blocking client. `timeout` (seconds) is the default deadline of every call; each call
    may pass its own."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None):
        self.target, self.timeout = target, timeout
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.JaxServeStub(self.channel)

    def stream(self, prompt: str | Sequence[int] | None = None, *, messages=None, request_id: str | None = None,
               priority: int = 0, timeout: float | None = None, **sampling) -> Iterator[Delta]:
        """Yields deltas as tokens arrive. Leaving the loop early cancels the call, which aborts
        the request on the server."""
        call = self.stub.Generate(generate_request(prompt, messages=messages, request_id=request_id,
                                                   priority=priority, **sampling), timeout=self._timeout(timeout))
        try:
            for msg in call:
                yield delta_of(msg)
        except grpc.RpcError as e:
            raise error_from(e) from None
        finally:
            call.cancel()  # no-op once the stream has ended

    def generate(self, prompt: str | Sequence[int], **kwargs) -> Result:
        """The whole output: `.text`, `.token_ids`, `.finish_reason`, `.usage`, `.timings`."""
        result = Result()
        for delta in self.stream(prompt, **kwargs):
            result.add(delta)
        return result

    def chat(self, messages: Sequence[dict], **kwargs) -> Result:
        """messages: [{"role": "user", "content": ...}, ...], rendered with the model's chat template."""
        return self.generate(None, messages=messages, **kwargs)

    def tokenize(self, text: str | None = None, *, messages=None, add_special_tokens: bool = True,
                 timeout: float | None = None) -> list[int]:
        req = tokenize_request(text, messages, add_special_tokens)
        return list(self._unary(self.stub.Tokenize, req, timeout).token_ids)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True,
                   timeout: float | None = None) -> str:
        req = pb.DetokenizeRequest(token_ids=list(token_ids), skip_special_tokens=skip_special_tokens)
        return self._unary(self.stub.Detokenize, req, timeout).text

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return self._unary(self.stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)

    def abort(self, request_id: str, timeout: float | None = None) -> bool:
        return self._unary(self.stub.Abort, pb.AbortRequest(request_id=request_id), timeout).aborted

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... from the standard grpc.health.v1 service."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return HEALTH_STATUS.get(reply.status, str(reply.status))

    def _unary(self, method, request, timeout):
        try:
            return method(request, timeout=self._timeout(timeout))
        except grpc.RpcError as e:
            raise error_from(e) from None

    def _timeout(self, timeout):
        return self.timeout if timeout is None else timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client with Client's methods. Create it inside a running event loop."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None):
        self.target, self.timeout = target, timeout
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.JaxServeStub(self.channel)

    async def stream(self, prompt: str | Sequence[int] | None = None, *, messages=None,
                     request_id: str | None = None, priority: int = 0, timeout: float | None = None,
                     **sampling) -> AsyncIterator[Delta]:
        call = self.stub.Generate(generate_request(prompt, messages=messages, request_id=request_id,
                                                   priority=priority, **sampling), timeout=self._timeout(timeout))
        try:
            async for msg in call:
                yield delta_of(msg)
        except grpc.RpcError as e:
            raise error_from(e) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str | Sequence[int], **kwargs) -> Result:
        result = Result()
        async for delta in self.stream(prompt, **kwargs):
            result.add(delta)
        return result

    async def chat(self, messages: Sequence[dict], **kwargs) -> Result:
        return await self.generate(None, messages=messages, **kwargs)

    async def tokenize(self, text: str | None = None, *, messages=None, add_special_tokens: bool = True,
                       timeout: float | None = None) -> list[int]:
        req = tokenize_request(text, messages, add_special_tokens)
        return list((await self._unary(self.stub.Tokenize, req, timeout)).token_ids)

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True,
                         timeout: float | None = None) -> str:
        req = pb.DetokenizeRequest(token_ids=list(token_ids), skip_special_tokens=skip_special_tokens)
        return (await self._unary(self.stub.Detokenize, req, timeout)).text

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    async def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return await self._unary(self.stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)

    async def abort(self, request_id: str, timeout: float | None = None) -> bool:
        return (await self._unary(self.stub.Abort, pb.AbortRequest(request_id=request_id), timeout)).aborted

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return HEALTH_STATUS.get(reply.status, str(reply.status))

    async def _unary(self, method, request, timeout):
        try:
            return await method(request, timeout=self._timeout(timeout))
        except grpc.RpcError as e:
            raise error_from(e) from None

    def _timeout(self, timeout):
        return self.timeout if timeout is None else timeout

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
