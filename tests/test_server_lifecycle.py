"""Server start-up errors and SIGTERM draining, each on its own `jaxserve serve` process."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from engine_runs import SMALL_ARGS
from server_process import ServerProcess

from jaxserve import SamplingParams
from jaxserve.client import Client, JaxServeError

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("args,message", [
    (["--mesh", "pp=2"], "unknown axis 'pp'"),
    (["--mesh", "tp=0"], "tp"),
    (["--mesh", "tp=16"], "devices"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be positive"),
    (["--port", "-5"], "--port must be positive"),
])
def test_bad_serve_arguments_fail_in_one_line(args, message):
    out = subprocess.run([sys.executable, "-m", "jaxserve.cli", "serve", *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("jaxserve: error:") and message in out.stderr


def test_sigterm_drains_in_flight_requests(smollm2_checkpoint):
    server = ServerProcess(str(smollm2_checkpoint), *SMALL_ARGS, "--drain-timeout", "60")
    try:
        results, started = {}, threading.Event()

        def long_request():
            with Client(server.address, timeout=120) as c:
                for delta in c.stream("Tell me about the moon.", max_tokens=24, ignore_eos=True, temperature=0):
                    results.setdefault("deltas", []).append(delta)
                    started.set()

        worker = threading.Thread(target=long_request)
        worker.start()
        assert started.wait(60)
        server.terminate()
        time.sleep(0.5)
        with Client(server.address, timeout=10) as c, pytest.raises(JaxServeError) as refused:
            c.generate("too late", max_tokens=2)
        worker.join(120)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        final = results["deltas"][-1]
        assert final.finished and final.finish_reason == "length" and final.usage.completion_tokens == 24
        assert server.proc.wait(60) == 0
        log = server.output()
        assert "SIGTERM: stopping intake, draining 1 in-flight requests" in log and "stopped" in log
    finally:
        server.stop()


def test_mesh_server_matches_single_device(smollm2_checkpoint, smollm2_llm):
    """`serve --mesh tp=2,dp=2`: two replicas of two devices each (9 query / 3 KV heads do not split
    over tp=2, so attention is replicated and the FFN split); greedy outputs equal one device's."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "List three fruits:"]
    want = smollm2_llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    server = ServerProcess(str(smollm2_checkpoint), "--mesh", "tp=2,dp=2", *SMALL_ARGS)
    try:
        with Client(server.address, timeout=120) as client, ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: client.generate(p, max_tokens=16, temperature=0), prompts))
            info = client.server_info()
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert (info.mesh, info.num_devices) == ("tp=2,dp=2", 4)
        assert server.output().count("starting engine replica") == 2
    finally:
        assert server.stop() == 0
