"""Disaggregated serving across processes: a real prefill server (`--role prefill --mesh tp=2`) and a
real decode server (`--role decode --mesh tp=1`, the one address clients use) on a tiny random
Llama, KV pages pulled with jax.experimental.transfer.

Exactness against an in-process colocated engine, aborts and disconnects, and real SIGKILLs of
either server mid-flight: every request completes or ends with a clear gRPC status, and every page
on the surviving (or restarted) servers is free afterwards.
"""
import concurrent.futures
import re
import time
import urllib.request

import grpc
import pytest
from engine_runs import run_batch
from server_process import ServerProcess, wait_until_idle
from tiny_models import make_hf_model, save_safetensors

from jaxserve import SamplingParams
from jaxserve.checkpoint import load_model
from jaxserve.client import Client, JaxServeError
from jaxserve.engine import Engine, EngineConfig

ARGS = ("--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--kv-cache-memory", "1M", "--max-model-len", "256")
CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory=1 << 20, max_model_len=256)
SHARED = [(5 * j) % 290 + 3 for j in range(40)]  # prefix-cache hits on the prefill side (page size 16)
LEASE_S = 3.0


def prompts():
    return [(SHARED if i % 3 == 0 else []) + [(11 * i + 7 * j) % 290 + 5 for j in range(3 + (i * 5) % 40)]
            for i in range(32)]


def sampling(i):
    if i % 4 == 1:
        return dict(max_tokens=7, temperature=0.8, top_p=0.9, seed=50 + i, ignore_eos=True)
    return dict(max_tokens=1 if i % 8 == 6 else 9, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_safetensors(make_hf_model("llama", seed=5), tmp_path_factory.mktemp("disagg-servers") / "llama")


@pytest.fixture(scope="module")
def expected(checkpoint):
    """The colocated engine's tokens for every prompt."""
    engine = Engine(load_model(checkpoint, progress=False), CONFIG)
    return [run_batch(engine, [p], SamplingParams(**sampling(i)))[0] for i, p in enumerate(prompts())]


@pytest.fixture(scope="module")
def servers(checkpoint):
    prefill = ServerProcess(str(checkpoint), "--role", "prefill", "--mesh", "tp=2", *ARGS,
                            "--kv-export-lease-timeout", str(LEASE_S))
    decode = ServerProcess(str(checkpoint), "--role", "decode", "--prefill-servers", prefill.address, *ARGS)
    wait_for_transfers(decode)
    yield prefill, decode
    for server in (decode, prefill):
        server.stop()


def wait_for_transfers(decode, timeout=60):
    """The decode server connects in the background: send requests until one goes through a prefill server."""
    deadline = time.monotonic() + timeout
    with Client(decode.address) as client:
        before = client.server_info().transfers_completed
        while client.server_info().transfers_completed == before:
            assert time.monotonic() < deadline, "the decode server never used its prefill server:\n" + \
                decode.output()[-3000:]
            client.generate([5, 6, 7], max_tokens=2, temperature=0)
            time.sleep(0.2)


def generate_all(address, items):
    def one(item):
        i, prompt = item
        with Client(address) as client:
            try:
                return client.generate(prompt, **sampling(i)).token_ids
            except JaxServeError as e:
                return e.code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, items))


def generate_all_killing(address, items, victim, watched, ready):
    """Every request sent at once; `victim` is SIGKILLed as soon as ready(server info of `watched`)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool, Client(watched.address) as client:
        running = pool.submit(generate_all, address, items)
        while not ready(client.server_info()):
            assert not running.done(), "every request finished before the kill"
            time.sleep(0.002)
        victim.kill()
        return running.result()


def idle_everywhere(*servers):
    for server in servers:
        with Client(server.address) as client:
            info = wait_until_idle(client)
            for _ in range(50):  # pinned exports end by a Release call or the lease timeout
                if info.exports_pinned == 0 and info.imports_in_flight == 0:
                    break
                time.sleep(0.2)
                info = client.server_info()
            assert (info.pages_free, info.exports_pinned, info.imports_in_flight) == (info.pages_total, 0, 0), info


def test_outputs_equal_colocated_serving(servers, expected):
    prefill, decode = servers
    assert generate_all(decode.address, list(enumerate(prompts()))) == expected
    idle_everywhere(prefill, decode)
    with Client(decode.address) as client:
        info = client.server_info()
    assert info.role == "decode" and info.transfers_completed >= 28 and info.transfer_failures == 0
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{decode.metrics_port}/metrics").read().decode()
    shown = re.search(r'^jaxserve:kv_transfers_completed\{model_name="[^"]*"\} (\S+)$', metrics, re.M)
    assert shown and float(shown.group(1)) == info.transfers_completed
    with Client(prefill.address) as client:
        assert client.server_info().role == "prefill"


def test_aborts_and_disconnects_free_every_page(servers):
    prefill, decode = servers
    long_prompt = [(3 * j) % 290 + 5 for j in range(200)]
    with Client(decode.address) as client:
        # Abort while the prompt is still on the prefill server (200 tokens: 7 chunks).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reasons = pool.submit(lambda: [d.finish_reason for d in client.stream(
                long_prompt, request_id="pre", max_tokens=40, temperature=0, ignore_eos=True) if d.finished])
            deadline = time.monotonic() + 5
            while not client.abort("pre"):   # once the decode server has it in flight
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert reasons.result() == ["abort"]
        # Abort while decoding, and leave a stream after its first token (the transfer under way).
        stream = client.stream(long_prompt[:30], request_id="dec", max_tokens=200, temperature=0, ignore_eos=True)
        next(stream)
        assert client.abort("dec")
        assert [d.finish_reason for d in stream if d.finished] == ["abort"]
        for n in range(3):
            stream = client.stream(long_prompt[n:n + 30], max_tokens=200, temperature=0, ignore_eos=True)
            next(stream)
            stream.close()
    idle_everywhere(prefill, decode)


def test_prefill_server_killed_mid_flight_loses_no_request(servers, expected):
    prefill, decode = servers
    with Client(decode.address) as client:
        before = client.server_info().transfers_completed
    results = generate_all_killing(decode.address, list(enumerate(prompts())), prefill, decode,
                                   lambda info: info.transfers_completed >= before + 4)
    assert results == expected   # each finished: on its prefill server, or prefilled again on the decode server
    with Client(decode.address) as client:
        assert client.server_info().transfers_completed - before < 32   # some were prefilled here instead
    idle_everywhere(decode)
    prefill.restart()            # the same address: the decode server goes back to it
    wait_for_transfers(decode)
    idle_everywhere(prefill, decode)


def test_decode_server_killed_mid_flight_and_restarted(servers, expected):
    prefill, decode = servers
    results = generate_all_killing(decode.address, list(enumerate(prompts())), decode, prefill,
                                   lambda info: info.exports_pinned > 0)   # a transfer under way
    # Each request either completed or got a clear status (its server went away): none hangs.
    assert all(r == want or r == grpc.StatusCode.UNAVAILABLE for r, want in zip(results, expected)), results
    assert grpc.StatusCode.UNAVAILABLE in results
    idle_everywhere(prefill)     # its pinned pages come back when their leases expire
    decode.restart()
    wait_for_transfers(decode)
    assert generate_all(decode.address, list(enumerate(prompts()))[:8]) == expected[:8]
    idle_everywhere(prefill, decode)
