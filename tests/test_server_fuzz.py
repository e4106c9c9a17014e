"""Property-based fuzzing of the live server: 1,000+ random and malformed requests (hypothesis).

The server must never crash; every bad request gets a clear status (INVALID_ARGUMENT naming what
is wrong, or ALREADY_EXISTS for a reused id); requests that are plainly invalid never succeed; and
afterwards a normal request still works and every KV page is free.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import wait_until_idle

from jaxserve.client import Client
from jaxserve.v1 import jaxserve_pb2 as pb

pytestmark = pytest.mark.slow
VOCAB = 49152
BATCH, EXAMPLES = 20, 52  # requests per example (sent concurrently) x examples > 1,000
SENT = {"requests": 0, "ok": 0}
ALLOWED_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS}

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 0.5, 1.0]))
sampling = st.builds(
    pb.SamplingParams,
    max_tokens=st.one_of(st.none(), st.integers(-3, 4), st.just(600), st.just(2**31 - 1)),
    temperature=st.one_of(st.none(), floats, st.floats(-2, 2, width=32)),
    top_p=st.one_of(st.none(), floats), top_k=st.one_of(st.none(), st.integers(-5, 100)),
    min_p=st.one_of(st.none(), floats), repetition_penalty=st.one_of(st.none(), floats),
    presence_penalty=st.one_of(st.none(), st.floats(-3, 3, width=32)),
    frequency_penalty=st.one_of(st.none(), st.floats(-3, 3, width=32)),
    seed=st.one_of(st.none(), st.integers(-2**40, 2**40)), ignore_eos=st.booleans(),
    stop=st.lists(st.text(max_size=3), max_size=2), stop_token_ids=st.lists(st.integers(-2, VOCAB + 2), max_size=2),
    logprobs=st.one_of(st.none(), st.integers(-2, 25)), prompt_logprobs=st.booleans())
messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "robot", ""]),
                              content=st.text(max_size=30)), max_size=3)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=draw(sampling), priority=draw(st.integers(-2**31, 2**31 - 1)),
                             request_id=draw(st.sampled_from(["", "", "", "fuzz-dup"])))
    kind = draw(st.sampled_from(["text", "ids", "chat", "none"]))
    if kind == "text":
        req.text = draw(st.text(max_size=40))
    elif kind == "ids":
        req.token_ids.ids.extend(draw(st.lists(st.integers(-10, VOCAB + 10), max_size=24)))
    elif kind == "chat":
        req.chat.messages.extend(draw(messages))
    return req


# Well-formed requests, so the happy path runs under the same concurrency as the junk.
valid_requests = st.builds(
    pb.GenerateRequest, text=st.text(min_size=1, max_size=40),
    sampling=st.builds(pb.SamplingParams, max_tokens=st.integers(1, 4), temperature=st.floats(0, 2, width=32),
                       top_p=st.floats(0.0625, 1, width=32), top_k=st.integers(0, 50), seed=st.integers(0, 2**31 - 1),
                       repetition_penalty=st.floats(0.5, 2, width=32), logprobs=st.integers(0, 20)))
requests = st.one_of(generate_requests(), valid_requests, st.binary(max_size=64))  # 1 in 3 raw bytes


def plainly_invalid(req) -> str | None:
    """Independent of the server's code: a reason this request must be refused, or None."""
    if isinstance(req, bytes):
        return None  # may or may not decode
    s, kind = req.sampling, req.WhichOneof("input")
    if kind is None or (kind == "text" and not req.text) or (kind == "token_ids" and not req.token_ids.ids):
        return "no prompt"
    if kind == "token_ids" and any(not 0 <= t < VOCAB for t in req.token_ids.ids):
        return "token id out of range"
    if s.HasField("max_tokens") and s.max_tokens <= 0:
        return "max_tokens"
    if s.HasField("temperature") and not s.temperature >= 0:
        return "temperature"
    if s.HasField("top_p") and not 0 < s.top_p <= 1:
        return "top_p"
    if s.HasField("seed") and not 0 <= s.seed < 2**31:
        return "seed"
    return None


def send(address: str, req) -> tuple[grpc.StatusCode, str, pb.GenerateResponse | None]:
    channel = grpc.insecure_channel(address)
    raw = isinstance(req, bytes)
    call = channel.unary_stream("/jaxserve.v1.JaxServe/Generate",
                                request_serializer=(lambda b: b) if raw else pb.GenerateRequest.SerializeToString,
                                response_deserializer=pb.GenerateResponse.FromString)
    try:
        if not raw and not req.sampling.HasField("max_tokens"):
            req.sampling.max_tokens = 4  # the default 16 would only make the test slower
        last = list(call(req, timeout=120))[-1]
        return grpc.StatusCode.OK, "", last
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None
    finally:
        channel.close()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(batch=st.lists(requests, min_size=BATCH, max_size=BATCH))
def test_random_and_malformed_requests(grpc_server, batch):
    with ThreadPoolExecutor(BATCH) as pool:
        outcomes = list(pool.map(lambda r: send(grpc_server.address, r), batch))
    SENT["requests"] += len(batch)
    assert grpc_server.proc.poll() is None, "the server died"
    for req, (code, message, last) in zip(batch, outcomes):
        reason = plainly_invalid(req)
        if code == grpc.StatusCode.OK:
            assert reason is None, f"accepted a request with bad {reason}: {req}"
            assert last.HasField("complete") and last.complete.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            assert last.complete.usage.completion_tokens <= max(req.sampling.max_tokens, 1)
            SENT["ok"] += 1
        else:
            assert code in ALLOWED_ERRORS, (code, message, req)
            assert message and not message.startswith("Exception"), (code, message)


def test_server_still_serves_after_fuzzing(grpc_server):
    assert SENT["requests"] >= 1000 or SENT["requests"] == 0  # 0: the fuzz test was deselected
    assert grpc_server.proc.poll() is None
    with Client(grpc_server.address, timeout=60) as client:
        out = client.generate("The capital of France is", max_tokens=4, temperature=0, ignore_eos=True)
        assert out.finish_reason == "length" and len(out.token_ids) == 4
        info = wait_until_idle(client)
        assert info.pages_free == info.pages_total and info.running_requests == 0
    if SENT["requests"]:
        assert SENT["ok"] > 200, SENT  # the fuzzer also exercised the happy path
