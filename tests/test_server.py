"""End to end against a real `jaxserve serve` process on localhost (the session `grpc_server`)."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_process import wait_until_idle

from jaxserve import SamplingParams
from jaxserve.client import AsyncClient, Client, JaxServeError

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           [504, 3575, 282, 4649, 314]]
CHAT = [{"role": "user", "content": "Name three primary colors."}]
MODEL_LABEL = re.compile(r'model_name="[^"]*",?')


def scrape(port: int) -> dict[str, float]:
    """{series: value} from /metrics, each series named without its model_name label (every
    jaxserve series has one: test_metrics_carry_the_model_name)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[MODEL_LABEL.sub("", name).replace("{}", "").replace(",}", "}")] = float(value)
    return samples


@pytest.fixture()
def client(grpc_server):
    with Client(grpc_server.address, timeout=120) as c:
        yield c
    with Client(grpc_server.address) as c:  # every test leaves the server idle with all pages free
        info = wait_until_idle(c)
        assert info.pages_free == info.pages_total and info.running_requests == 0, info


def test_health_and_reflection(client, grpc_server):
    assert client.health() == "SERVING"
    assert client.health("jaxserve.v1.JaxServe") == "SERVING"
    channel = grpc.insecure_channel(grpc_server.address)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(replies).list_services_response.service}
    assert {"jaxserve.v1.JaxServe", "grpc.health.v1.Health"} <= names
    channel.close()


def test_model_and_server_info(client, smollm2_llm):
    info = client.model_info()
    cfg = smollm2_llm.config
    assert (info.architecture, info.vocab_size, info.num_heads, info.num_kv_heads) == (
        "llama", cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads)
    assert info.max_model_len == 512 and info.has_chat_template and list(info.eos_token_ids)
    server = client.server_info()
    assert server.platform == "cpu" and server.mesh == "tp=1,dp=1" and server.kv_cache_dtype == "float32"
    assert server.pages_total > 0 and server.max_num_seqs == 8 and server.max_queued_requests == 56


def test_streamed_greedy_output_equals_llm_generate(client, smollm2_llm):
    params = SamplingParams(max_tokens=24, temperature=0)
    expected = smollm2_llm.generate(PROMPTS, params) + smollm2_llm.chat(CHAT, params)
    for prompt, want in zip(PROMPTS + [None], expected):
        deltas = list(client.stream(prompt, messages=CHAT if prompt is None else None, max_tokens=24, temperature=0))
        assert all(not d.finished for d in deltas[:-1]) and deltas[-1].finished
        assert sum(len(d.token_ids) for d in deltas) == len(want.token_ids) and len(deltas) > 2  # really streamed
        got = [t for d in deltas for t in d.token_ids]
        assert got == want.token_ids and "".join(d.text for d in deltas) == want.text
        final = deltas[-1]
        assert final.finish_reason == want.finish_reason
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (
            want.usage.prompt_tokens, want.usage.completion_tokens)
        assert 0 <= final.timings.queue_time_s <= final.timings.ttft_s <= final.timings.e2e_s


def test_sampling_options_logprobs_and_seed(client):
    kw = dict(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=7, logprobs=3, stop=["\n\n"])
    a, b = client.generate("Write a haiku about rain.", **kw), client.generate("Write a haiku about rain.", **kw)
    assert a.token_ids == b.token_ids  # seeded sampling is reproducible across requests
    assert len(a.logprobs) == len(a.token_ids) and all(len(lp.top) == 3 for lp in a.logprobs)
    scored = client.generate("The cat sat on the mat", max_tokens=1, prompt_logprobs=True)
    assert len(scored.prompt_logprobs) == scored.usage.prompt_tokens - 1
    assert all(lp <= 0 for lp in scored.prompt_logprobs)


def test_tokenize_detokenize(client, smollm2_llm):
    ids = client.tokenize("Hello, world!")
    assert ids == smollm2_llm.tokenizer.encode("Hello, world!")
    assert client.detokenize(ids) == "Hello, world!"
    assert client.tokenize(messages=CHAT) == smollm2_llm.tokenizer.encode_chat(CHAT)
    with pytest.raises(JaxServeError) as e:
        client.detokenize([10**8])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.value.message


def test_64_concurrent_streams_complete_and_a_65th_is_refused(grpc_server, client):
    async def run():
        async with AsyncClient(grpc_server.address, timeout=300) as ac:
            tasks = [asyncio.create_task(ac.generate([100 + i, 200 + i, 300 + i], max_tokens=16, temperature=0,
                                                     ignore_eos=True)) for i in range(64)]
            while True:  # all 64 admitted: 8 running + 56 waiting fills the server
                info = await ac.server_info()
                if info.running_requests + info.waiting_requests == 64:
                    break
                await asyncio.sleep(0.02)
            with pytest.raises(JaxServeError) as refused:
                await ac.generate("one too many", max_tokens=1)
            return await asyncio.gather(*tasks), refused.value

    results, refused = asyncio.run(run())
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in refused.message
    assert len(results) == 64
    assert all(r.finish_reason == "length" and len(r.token_ids) == 16 for r in results)


def test_cancel_mid_stream_returns_pages(client):
    stream = client.stream("Tell me a long story about dragons.", max_tokens=400, ignore_eos=True)
    got = [next(stream) for _ in range(3)]
    assert all(d.token_ids for d in got)
    assert client.server_info().running_requests == 1
    stream.close()  # leaves the loop early: the call is cancelled and the server aborts it
    info = wait_until_idle(client)
    assert info.running_requests == 0 and info.pages_free == info.pages_total


def test_deadline_aborts_request(client):
    start = time.monotonic()
    with pytest.raises(JaxServeError) as e:
        client.generate("Count to a thousand:", max_tokens=400, ignore_eos=True, timeout=1.5)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 10
    info = wait_until_idle(client)
    assert info.running_requests == 0 and info.pages_free == info.pages_total


def test_abort_by_request_id(client):
    stream = client.stream("Describe the sea.", request_id="abort-me", max_tokens=400, ignore_eos=True)
    next(stream)
    assert client.abort("abort-me") is True
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert client.abort("abort-me") is False and client.abort("never-existed") is False


@pytest.mark.parametrize("prompt,kwargs,field", [
    ("hi", dict(temperature=-0.5), "temperature"),
    ("hi", dict(top_p=1.5), "top_p"),
    ("hi", dict(max_tokens=0), "max_tokens"),
    ("hi", dict(top_k=-3), "top_k"),
    ("hi", dict(logprobs=50), "logprobs"),
    ("", {}, "prompt"),
    ([1, 2, 10**6], {}, "prompt token ids"),
    ("word " * 600, {}, "prompt"),                       # beyond --max-model-len 512
    ("hi", dict(max_tokens=600), "max_tokens"),
])
def test_bad_requests_get_invalid_argument_naming_the_field(client, prompt, kwargs, field):
    with pytest.raises(JaxServeError) as e:
        client.generate(prompt, **kwargs)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.message, e.value
    assert client.generate("Still fine?", max_tokens=2, ignore_eos=True).finish_reason == "length"


def test_duplicate_request_id_is_already_exists(client):
    stream = client.stream("Long one", request_id="dup", max_tokens=400, ignore_eos=True)
    next(stream)
    with pytest.raises(JaxServeError) as e:
        client.generate("again", request_id="dup")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    stream.close()


def test_metrics_use_vllm_names(client, grpc_server):
    client.generate("Metrics please", max_tokens=4)
    samples = scrape(grpc_server.metrics_port)
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count",
                 "generation_tokens_total", "prompt_tokens_total", "prefix_cache_queries_total"):
        assert samples["jaxserve:" + name] > 0, name
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hits_total"):
        assert "jaxserve:" + name in samples
    assert samples['jaxserve:request_success_total{finished_reason="length"}'] >= 1


def test_request_cli_streams_the_answer(grpc_server, smollm2_llm):
    want = smollm2_llm.chat(CHAT, SamplingParams(max_tokens=20, temperature=0))[0]
    cmd = [sys.executable, "-m", "jaxserve.cli", "request", "--server", grpc_server.address, "--chat",
           "--prompt", CHAT[0]["content"], "--max-tokens", "20", "--temperature", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == want.text + "\n"
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout)["token_ids"] == want.token_ids
    bad = subprocess.run(cmd[:-2] + ["--temperature", "-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("jaxserve: error: INVALID_ARGUMENT: temperature")


def test_async_client_mirrors_the_sync_one(grpc_server, client):
    want = client.generate("Roses are red,", max_tokens=10, temperature=0)

    async def run():
        async with AsyncClient(grpc_server.address, timeout=120) as ac:
            deltas = [d async for d in ac.stream("Roses are red,", max_tokens=10, temperature=0)]
            chat = await ac.chat(CHAT, max_tokens=4, temperature=0)
            with pytest.raises(JaxServeError) as bad:
                await ac.generate("x", top_p=0)
            return (deltas, chat, await ac.tokenize("Roses"), await ac.detokenize([504]), await ac.health(),
                    await ac.model_info(), bad.value)

    deltas, chat, ids, text, health, info, bad = asyncio.run(run())
    assert [t for d in deltas for t in d.token_ids] == want.token_ids and deltas[-1].finish_reason == "length"
    assert chat.token_ids == client.chat(CHAT, max_tokens=4, temperature=0).token_ids
    assert ids == client.tokenize("Roses") and text == client.detokenize([504])
    assert health == "SERVING" and info.architecture == "llama"
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in bad.message


# ---- what clients can do to the log and the metrics -------------------------------------------------

def test_client_ids_reach_the_log_escaped_and_bounded(client, grpc_server):
    """Request ids are the client's: a newline must not forge a log line, a NUL must not reach the
    log file, and a 100,000-character id must not make a 100 kB line."""
    evil = {"forge": "x\n2026-01-01 00:00:00 INFO jaxserve.server.service: request FORGED finished (stop)",
            "nul": "nul\x00byte", "long": "L" * 100_000}
    for rid in evil.values():
        assert client.generate("Hi", request_id=rid, max_tokens=2, ignore_eos=True).request_id == rid
    with pytest.raises(JaxServeError):
        client.generate("", request_id="refused\nFORGED refusal")  # the refusal path logs the id too
    log_text = grpc_server.output()
    lines = log_text.splitlines()
    assert not any("FORGED" in line and not line.startswith("20") for line in lines)
    assert not [line for line in lines if line.startswith("2026-01-01")]
    assert "\x00" not in log_text
    assert "request x\\n2026-01-01" in log_text and "nul\\x00byte" in log_text and "+99800 chars" in log_text
    assert max(len(line) for line in lines) < 2000


def test_every_undecodable_request_is_counted_and_logged(client, grpc_server):
    """Bytes that are not a GenerateRequest get INVALID_ARGUMENT, and each one is counted in
    request_failure{code="INVALID_ARGUMENT"}; the log names them, at a bounded rate."""
    key = 'jaxserve:request_failure_total{code="INVALID_ARGUMENT"}'
    before = scrape(grpc_server.metrics_port).get(key, 0.0)
    channel = grpc.insecure_channel(grpc_server.address)
    call = channel.unary_stream("/jaxserve.v1.JaxServe/Generate", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
    seen = 0
    for i in range(300):
        payload = bytes([0x0A, 0xFF, i % 256]) + bytes(range(i % 7))  # field 1, length 255: truncated
        with pytest.raises(grpc.RpcError) as e:
            list(call(payload, timeout=30))
        seen += e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    assert seen == 300
    assert scrape(grpc_server.metrics_port)[key] - before == seen
    logged = [line for line in grpc_server.output().splitlines() if "undecodable request refused" in line]
    assert 1 <= len(logged) <= 100  # 300 refusals in a few seconds: at most 50 lines per 10 s


def test_metrics_carry_the_model_name(client, grpc_server):
    client.generate("Label me", max_tokens=2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{grpc_server.metrics_port}/metrics").read().decode()
    series = [line for line in text.splitlines() if line.startswith("jaxserve:")]
    assert len(series) > 20
    unlabelled = [line for line in series if f'model_name="{grpc_server.model}"' not in line]
    assert unlabelled == []


@pytest.mark.parametrize("timeout", [1.5, 10.01])
def test_deadlines_are_logged_and_counted_as_deadline_exceeded(client, grpc_server, timeout):
    """gRPC sends deadlines between 10 s and 100 s rounded up to 100 ms, so the client's deadline
    fires before the server's: its cancellation is still the deadline, not a client that gave up.
    Eight long requests take every seat first (the request under test has a lower priority), so
    it runs for well over 10 s."""
    key = 'jaxserve:request_failure_total{code="%s"}'
    before = scrape(grpc_server.metrics_port)
    rid = f"deadline-{timeout}"
    fillers = [client.stream([100 + i, 200, 300], max_tokens=490, ignore_eos=True) for i in range(8)]
    for stream in fillers:
        next(stream)  # running
    try:
        with pytest.raises(JaxServeError) as e:
            client.generate("Count to a thousand:", request_id=rid, max_tokens=480, ignore_eos=True, priority=1,
                            timeout=timeout)
    finally:
        for stream in fillers:
            stream.close()
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_idle(client)
    after = scrape(grpc_server.metrics_port)
    assert after[key % "DEADLINE_EXCEEDED"] - before.get(key % "DEADLINE_EXCEEDED", 0) == 1
    assert after.get(key % "CANCELLED", 0) - before.get(key % "CANCELLED", 0) <= len(fillers)  # fillers only
    lines = [line for line in grpc_server.output().splitlines() if f"request {rid} " in line]
    assert len(lines) == 1 and "deadline exceeded after" in lines[0] and "refused" not in lines[0], lines
