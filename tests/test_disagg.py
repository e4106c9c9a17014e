"""Disaggregated prefill and decode in one process (jaxserve.disagg.DisaggPool): a prefill engine on
tp=2 (devices 0-1) hands requests to two decode replicas on tp=1 (devices 2 and 3) with
jax.device_put, on a tiny random Llama (2 kv heads, so tp=2 splits every page and the two sides
lay pages out differently).

Exactness: 32 mixed requests (shared prefixes, seeded sampling, logprobs, one-token answers)
give the colocated engine's tokens. Faults: aborts and disconnects before, during and after the
transfer, a decode side out of pages, failed and stalled transfers; each ends with every page
free on both sides and every request either complete or ended with a clear reason.
"""
import asyncio
import dataclasses

import jax
import pytest
from tiny_models import make_hf_model, save_safetensors

from jaxserve import SamplingParams
from jaxserve.checkpoint import load_model
from jaxserve.disagg import DisaggPool
from jaxserve.engine import Engine, EngineConfig
from jaxserve.engine.build import load_disaggregated_engines
from jaxserve.parallel import DisaggMeshSpec, MeshSpec, parse_deployment

CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, num_pages=40, page_size=4, max_model_len=256)
SHARED = [(5 * j) % 290 + 3 for j in range(17)]  # 4 full pages: prefix-cache hits on the prefill side


def prompts_and_params():
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = []
    for i in range(32):
        prompt = (SHARED if i % 3 == 0 else []) + [(11 * i + 7 * j) % 290 + 5 for j in range(3 + (i * 5) % 23)]
        if i % 4 == 1:
            params = SamplingParams(max_tokens=6 + i % 5, temperature=0.8, top_p=0.9, seed=100 + i, ignore_eos=True)
        elif i % 8 == 2:
            params = dataclasses.replace(greedy, logprobs=2)
        elif i % 8 == 6:
            params = dataclasses.replace(greedy, max_tokens=1)   # finishes on the prefill side
        else:
            params = greedy
        out.append((prompt, params))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_safetensors(make_hf_model("llama", seed=3), tmp_path_factory.mktemp("disagg") / "llama")


@pytest.fixture(scope="module")
def colocated(checkpoint):
    engine = Engine(load_model(checkpoint, progress=False), CONFIG)
    outputs = []
    for prompt, params in prompts_and_params():
        rid = engine.add_request(prompt, params)
        outputs.append((rid, []))
    tokens = dict(outputs)
    for delta in engine.run_to_completion():
        tokens[delta.request_id] += delta.new_token_ids
    return [tokens[rid] for rid, _ in outputs]


@pytest.fixture(scope="module")
def engines(checkpoint):
    spec = parse_deployment("prefill:tp=2 decode:tp=1,dp=2")
    return load_disaggregated_engines(checkpoint, CONFIG, spec, progress=False)


class StalledOrFailing(DisaggPool):
    """Injects transfer faults at the transport boundary: the pages of chosen requests come from a
    source whose fetch raises, or whose arrays never become ready."""
    faults: dict[str, str] = {}

    async def _import(self, export):
        fault = self.faults.get(export.state.request_id)
        if fault is not None:
            export = dataclasses.replace(export, pages=_FaultyPages(fault, export.pages.nbytes))
        return await super()._import(export)


@dataclasses.dataclass(frozen=True)
class _FaultyPages:
    fault: str
    nbytes: int

    def fetch(self, place):
        if self.fault == "fail":
            raise ConnectionError("injected: the prefill side went away")
        return [_NeverReady()]

    def failed(self):
        pass


class _NeverReady:
    def is_ready(self):
        return False


@pytest.fixture
def pool(engines):
    prefill, decode = engines
    pool = StalledOrFailing(prefill, decode, max_queued_requests=64)
    pool.faults = {}
    yield pool
    for r in pool.replicas:  # the engines outlive the pool (module scope); stop only the threads
        r.shutdown()
    for e in prefill + decode:
        e.run_soon = None


async def collect(pool, rid, prompt, params):
    tokens, last = [], None
    async with pool.generate(prompt, params, rid, 0) as deltas:
        async for delta in deltas:
            tokens += delta.new_token_ids
            last = delta
    return tokens, last


def assert_all_pages_free(engines):
    prefill, decode = engines
    for e in prefill + decode:
        s = e.stats()
        assert (s.pages_free, s.num_exported, s.num_receiving, s.num_running, s.num_waiting) == (
            s.pages_total, 0, 0, 0, 0), s


async def settle(pool):
    """Leases end on the prefill engine's thread: wait until every pin is gone."""
    for _ in range(400):
        stats = await pool.stats()
        if stats.exports_pinned == 0 and stats.imports_in_flight == 0 and stats.pages_free == stats.pages_total:
            return stats
        await asyncio.sleep(0.01)
    return await pool.stats()


def test_disaggregated_mesh_text():
    assert parse_deployment("prefill:tp=2 decode:tp=1,dp=2") == DisaggMeshSpec(MeshSpec(tp=2), MeshSpec(tp=1, dp=2))
    assert parse_deployment("prefill:tp=1;decode:tp=4").decode == MeshSpec(tp=4)
    for text, message in [("prefill:tp=2", "decode is missing"), ("prefill:tp=2 prefill:tp=1", "prefill given twice"),
                          ("prefil:tp=2 decode:tp=2", "expected prefill:AXES decode:AXES"),
                          ("prefill:tp=0 decode:tp=1", "tp must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            parse_deployment(text)


def test_outputs_equal_colocated_serving(pool, engines, colocated):
    async def main():
        jobs = [collect(pool, f"r{i}", prompt, params) for i, (prompt, params) in enumerate(prompts_and_params())]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == colocated
    assert all(last.finished and last.finish_reason == "length" for _, last in results)
    stats = asyncio.run(settle(pool))
    assert stats.transfers_completed >= 28 and stats.transfer_failures == 0 and stats.transfer_bytes > 0
    prefill, decode = engines
    assert prefill[0].stats().prefix_cache_hits > 0                         # the shared prefix hit the cache
    assert all(e.stats().transfers_completed > 0 for e in decode)           # both decode replicas took some
    assert_all_pages_free(engines)


def test_aborts_and_disconnects_at_every_phase_free_every_page(pool, engines):
    long_prompt = [(3 * j) % 290 + 5 for j in range(100)]            # 4 chunked prefill steps
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def abort_when(rid, phase):
        while pool._where.get(rid, (None,))[0] != phase:
            await asyncio.sleep(0.001)
        assert await pool.abort(rid)

    async def leave_after(rid, n):
        async with pool.generate(long_prompt[:20], params, rid, 0) as deltas:
            async for delta in deltas:
                n -= len(delta.new_token_ids)
                if n <= 0:
                    return "left"

    async def main():
        aborted = {"pre": asyncio.create_task(collect(pool, "pre", long_prompt, params))}
        await asyncio.wait_for(abort_when("pre", "prefill"), 60)
        # The 8 decode seats (2 replicas x 4) taken: the next requests wait for a seat after prefill.
        busy = [asyncio.create_task(collect(pool, f"bg{i}", long_prompt[i:i + 6], short)) for i in range(8)]
        while sum(1 for phase, _ in pool._where.values() if phase == "decode") < 8:
            await asyncio.sleep(0.005)
        aborted["wait"] = asyncio.create_task(collect(pool, "wait", long_prompt[:50], params))
        await asyncio.wait_for(abort_when("wait", "waiting"), 60)
        left = [await asyncio.wait_for(leave_after("gone1", 1), 60)]           # left while waiting for a seat
        aborted["dec"] = asyncio.create_task(collect(pool, "dec", long_prompt[:40], params))
        await asyncio.wait_for(abort_when("dec", "decode"), 120)
        left.append(await asyncio.wait_for(leave_after("gone5", 5), 120))      # left while decoding
        done = await asyncio.gather(*busy)
        return done, {rid: await task for rid, task in aborted.items()}, left

    refused = sum(e.stats().imports_refused for e in engines[1])
    done, aborted, left = asyncio.run(main())
    assert sum(e.stats().imports_refused for e in engines[1]) > refused   # requests waited for a decode seat
    assert all(last.finish_reason == "length" and len(tokens) == 24 for tokens, last in done)
    for rid, (tokens, last) in aborted.items():
        assert last.finished and last.finish_reason == "abort", rid
    assert left == ["left", "left"]
    asyncio.run(settle(pool))
    assert_all_pages_free(engines)


def test_failed_and_stalled_transfers_fall_back_to_recomputing(pool, engines, colocated):
    items = prompts_and_params()
    pool.faults = {"f0": "fail", "f4": "stall"}
    for e in engines[1]:
        e.config = dataclasses.replace(e.config, kv_transfer_timeout=0.3)
    before = sum(e.stats().transfer_failures for e in engines[1])

    async def main():
        return await asyncio.gather(collect(pool, "f0", *items[0]), collect(pool, "f4", *items[4]))

    try:
        (t0, _), (t4, _) = asyncio.run(main())
    finally:
        for e in engines[1]:
            e.config = CONFIG
    assert (t0, t4) == (colocated[0], colocated[4])   # recomputed on the decode side: the same tokens
    assert sum(e.stats().transfer_failures for e in engines[1]) - before == 2
    asyncio.run(settle(pool))
    assert_all_pages_free(engines)


def test_mismatched_kv_layouts_are_refused_at_connect(checkpoint, engines):
    other = Engine(load_model(checkpoint, progress=False),  # one small bucket: only its KV layout matters
                   dataclasses.replace(CONFIG, kv_cache_dtype="int8", max_num_batched_tokens=4))
    with pytest.raises(ValueError, match="prefill and decode KV pages differ"):
        DisaggPool(engines[0], [other], max_queued_requests=1)
    assert jax.device_count() >= 4
