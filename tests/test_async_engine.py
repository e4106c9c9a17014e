"""AsyncEngine on the real SmolLM2: concurrent streams, early exit, abort, bad input, step errors, shutdown."""
import asyncio
import time

import pytest

from jaxserve import SamplingParams
from jaxserve.engine import AsyncEngine, EngineDeadError
from jaxserve.engine import Engine, EngineConfig
from jaxserve.errors import InvalidRequestError

pytestmark = pytest.mark.slow

from engine_runs import SERVER_ENGINE  # noqa: E402
from test_smollm2 import PROMPTS  # noqa: E402  (the same varied prompts as the parity test)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def run_alone(engine, prompt, params):
    """The LLM loop for one prompt on an otherwise idle engine: (token ids, text)."""
    rid = engine.add_request(prompt, params)
    tokens, text = [], ""
    while engine.has_unfinished():
        for d in engine.step():
            assert d.request_id == rid
            tokens += d.new_token_ids
            text += d.text
    return tokens, text


@pytest.fixture(scope="module")
def engine(smollm2_model):
    return Engine(smollm2_model, EngineConfig(**SERVER_ENGINE))  # the shared server's options (conftest)


@pytest.fixture(scope="module")
def reference(engine):
    """Greedy continuations of every prompt, each run alone, before any AsyncEngine exists."""
    return {i: run_alone(engine, p, greedy(4 + i)) for i, p in enumerate(PROMPTS)}


@pytest.fixture
def aengine(engine, reference):
    ae = AsyncEngine(engine)
    yield ae
    ae.shutdown()
    assert not ae._thread.is_alive()
    # Back on this thread only now that the engine thread is gone.
    assert not engine.has_unfinished()
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_pages == engine.block_manager.num_usable_pages


def run(coro, timeout=120):
    """asyncio.run with a deadline, so a wedged engine thread fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(ae, prompt, params=None, **kw):
    deltas = []
    async for d in ae.generate(prompt, params, **kw):
        deltas.append(d)
    return deltas


async def wait_until_idle(ae, timeout=15.0):
    """Polls the engine (from its own thread) until no request is left and every page is free."""
    deadline = time.monotonic() + timeout
    while True:
        free, usable, busy = await ae.call(
            lambda e: (e.block_manager.num_free_pages, e.block_manager.num_usable_pages, e.has_unfinished()))
        if free == usable and not busy:
            return
        assert time.monotonic() < deadline, f"pages not freed: {free}/{usable} free, busy={busy}"
        await asyncio.sleep(0.02)


def test_concurrent_streams_match_greedy(aengine, engine, reference):
    running = []  # engine.scheduler.num_running before each step, recorded on the engine thread

    def count_steps(e):
        def step():
            running.append(e.scheduler.num_running)
            return type(e).step(e)
        e.step = step

    async def main():
        await aengine.call(count_steps)
        try:
            return await asyncio.gather(*(collect(aengine, p, greedy(4 + i)) for i, p in enumerate(PROMPTS)))
        finally:
            await aengine.call(lambda e: delattr(e, "step"))

    results = run(main())
    assert max(running) >= 4 and len(running) < sum(4 + i for i in range(len(PROMPTS))) // 2  # batched
    for i, deltas in enumerate(results):
        tokens, text = reference[i]
        assert [t for d in deltas for t in d.new_token_ids] == tokens, PROMPTS[i]
        assert "".join(d.text for d in deltas) == text
        assert len(tokens) == 4 + i
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 4 + i
        assert len({d.request_id for d in deltas}) == 1
    assert len({r[0].request_id for r in results}) == len(PROMPTS)


def test_break_and_cancel_abort_and_free_pages(aengine, engine):
    long = greedy(400)  # would take far longer than the poll timeout to finish on its own

    async def main():
        requests = []
        async for d in aengine.generate(PROMPTS[2] * 8, long, request_id="leaver"):
            requests.append(await aengine.call(lambda e: e.scheduler.get_request("leaver")))
            if len(requests) == 2:
                break
        await wait_until_idle(aengine)
        first = requests[0]
        assert first.finish_reason == "abort" and len(first.output_token_ids) < 10

        got_one = asyncio.Event()

        async def consume():
            async for _ in aengine.generate(PROMPTS[0], long, request_id="cancelled"):
                got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), 30)
        cancelled = await aengine.call(lambda e: e.scheduler.get_request("cancelled"))
        assert cancelled is not None and cancelled.num_computed_tokens > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until_idle(aengine)
        assert cancelled.finish_reason == "abort" and len(cancelled.output_token_ids) < 10
        await aengine.call(lambda e: e.block_manager.check_invariants())

    run(main())


def test_invalid_request_raises_while_good_stream_completes(aengine, engine, reference):
    vocab = engine.model.config.vocab_size

    async def main():
        started = asyncio.Event()

        async def good_stream():
            deltas = []
            async for d in aengine.generate(PROMPTS[7], greedy(11), request_id="good"):
                deltas.append(d)
                started.set()
            return deltas

        good = asyncio.create_task(good_stream())
        await started.wait()  # it is running; each add below waits for at most one step
        bad_cases = [
            (([1, 2, vocab], greedy(3)), {}, "prompt token ids"),
            (("", greedy(3)), {}, "prompt is empty"),
            ((PROMPTS[0], greedy(engine.max_cached_tokens)), {}, "max_tokens"),
            ((PROMPTS[0], greedy(3)), {"priority": 1.5}, "priority"),
        ]
        for args, kw, field in bad_cases:
            with pytest.raises(InvalidRequestError, match=field):
                await collect(aengine, *args, **kw)
        assert await aengine.call(lambda e: e.scheduler.get_request("good") is not None)
        return await good

    deltas = run(main())
    assert [t for d in deltas for t in d.new_token_ids] == reference[7][0]
    assert deltas[-1].finish_reason == "length"


def test_abort_by_id_ends_the_stream(aengine):
    async def main():
        deltas = []
        async for d in aengine.generate(PROMPTS[1], greedy(400), request_id="victim"):
            deltas.append(d)
            if len(deltas) == 1:
                with pytest.raises(InvalidRequestError, match="request_id"):
                    await collect(aengine, PROMPTS[0], greedy(2), request_id="victim")
                assert await aengine.abort("victim") is True
        assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
        assert deltas[-1].new_token_ids == ()
        assert await aengine.abort("victim") is False
        assert await aengine.abort("never-existed") is False
        await wait_until_idle(aengine)

    run(main())


def test_step_error_reaches_streams_and_loop_survives(aengine, engine, reference):
    def install_failing_step(e):
        def failing_step():
            if e.scheduler.num_waiting + e.scheduler.num_running < 2:  # wait for both requests
                return type(e).step(e)
            del e.step  # fail once, then the real method is back
            raise RuntimeError("injected step failure")
        e.step = failing_step

    async def main():
        await aengine.call(install_failing_step)
        results = await asyncio.gather(collect(aengine, PROMPTS[3], greedy(5)),
                                       collect(aengine, PROMPTS[4], greedy(5)), return_exceptions=True)
        for r in results:
            assert isinstance(r, RuntimeError) and "injected" in str(r)
        assert aengine.num_step_errors == 1 and aengine._thread.is_alive()
        await wait_until_idle(aengine)
        # The loop keeps serving, and correctly.
        return await collect(aengine, PROMPTS[5], greedy(9))

    deltas = run(main())
    assert [t for d in deltas for t in d.new_token_ids] == reference[5][0]


def test_shutdown_aborts_pending_and_refuses_new_work(engine):
    ae = AsyncEngine(engine)

    async def main():
        deltas = []
        async for d in ae.generate(PROMPTS[6], greedy(400)):
            deltas.append(d)
            if len(deltas) == 1:
                ae.shutdown()
        assert not ae._thread.is_alive()
        assert deltas[-1].finish_reason == "abort" and len(deltas) < 10
        with pytest.raises(EngineDeadError):
            await collect(ae, PROMPTS[0], greedy(2))

    run(main())
    assert not engine.has_unfinished()
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_pages == engine.block_manager.num_usable_pages
