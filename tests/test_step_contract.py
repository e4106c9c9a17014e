"""The step contract (jaxserve/core/plan.py) on the host side: plans tell the runner which requests
ended, the runner's penalty rows follow the plans alone, and a runner may answer a request with
several accepted tokens (draft verification), of which the scheduler keeps those before a stop."""
import pytest

from jaxserve import SamplingParams
from jaxserve.core.block_manager import BlockManager
from jaxserve.core.plan import RunnerOutput, SampledToken
from jaxserve.core.request import Request, RequestStatus
from jaxserve.core.scheduler import Scheduler
from jaxserve.ops.backends import select_attention_backend
from jaxserve.runner.penalties import PenaltySlots
from pallas_kernels.kv_formats import FORMATS


def scheduler(num_pages=64, **kwargs) -> Scheduler:
    return Scheduler(BlockManager(num_pages, 4), **kwargs)


def tokens(*ids) -> tuple[SampledToken, ...]:
    return tuple(SampledToken(t, -0.5, ()) for t in ids)


def answer(plan, per_request: int = 1, first: int = 7) -> RunnerOutput:
    """Every sampling chunk gets `per_request` accepted tokens first, first + 1, ..."""
    return RunnerOutput({c.request_id: tokens(*range(first, first + per_request)) for c in plan.chunks if c.samples})


def test_plans_list_what_ended_since_the_last_one():
    s = scheduler(max_num_seqs=4)
    for rid, n in (("a", 1), ("b", 3), ("c", 3)):
        s.add_request(Request(rid, [1, 2, 3], SamplingParams(max_tokens=n)))
    plan = s.schedule()
    assert plan.finished_ids == ()
    s.update(plan, answer(plan))              # "a" reaches max_tokens
    assert s.abort("c")                       # aborted between steps
    plan = s.schedule()
    assert sorted(plan.finished_ids) == ["a", "c"] and [c.request_id for c in plan.chunks] == ["b"]
    s.update(plan, answer(plan))
    assert s.schedule().finished_ids == ()    # each id is told once


def test_penalty_rows_follow_the_plans_and_never_run_out():
    """Three rows, twelve penalised requests one after another: rows come back only through plans."""
    s, slots = scheduler(max_num_seqs=3), PenaltySlots(3, vocab_size=50)
    penalised = SamplingParams(max_tokens=2, repetition_penalty=1.3)
    for i in range(12):
        s.add_request(Request(f"r{i}", [1, 2, 3, 4, 5], penalised))
    while s.has_unfinished:
        plan = s.schedule()
        slots.release(plan.finished_ids + plan.preempted_ids)  # what ModelRunner.execute does first
        slots.assign(plan.chunks)
        assert len({slots.slot_of(c.request_id) for c in plan.chunks}) == len(plan.chunks)  # distinct rows
        s.update(plan, answer(plan))
    slots.release(s.schedule().finished_ids)
    assert slots.num_free == 3


def test_several_accepted_tokens_stop_at_the_first_that_ends_the_request():
    s = scheduler()
    s.add_request(Request("eos", [1, 2], SamplingParams(max_tokens=10), eos_token_ids={9}))
    s.add_request(Request("len", [1, 2], SamplingParams(max_tokens=2)))
    s.add_request(Request("run", [1, 2], SamplingParams(max_tokens=10)))
    plan = s.schedule()
    output = RunnerOutput({"eos": tokens(5, 9, 6), "len": tokens(5, 6, 7), "run": tokens(5, 6, 7)})
    updates = {u.request.request_id: u for u in s.update(plan, output)}
    assert [t.token_id for t in updates["eos"].sampled] == [5, 9]   # the token after EOS is dropped
    assert updates["eos"].request.status is RequestStatus.FINISHED_STOPPED
    assert updates["len"].request.output_token_ids == [5, 6] and updates["len"].request.finish_reason == "length"
    assert updates["run"].request.output_token_ids == [5, 6, 7] and not updates["run"].request.is_finished
    # No draft ran in this chunk, so none of the three has KV yet: the next chunk feeds them all.
    assert s.schedule().chunks[0].token_ids == (5, 6, 7)


def test_a_sampling_chunk_without_tokens_is_an_error():
    s = scheduler()
    s.add_request(Request("a", [1, 2], SamplingParams(max_tokens=3)))
    plan = s.schedule()
    with pytest.raises(KeyError, match="no sampled token"):
        s.update(plan, RunnerOutput({"a": ()}))


@pytest.mark.parametrize("fmt, impl", [("float32", "native"), ("int8", "native"), ("int4", "xla"), ("nvfp4", "xla")])
def test_the_attention_backend_is_what_runs_for_the_page_format(fmt, impl):
    """auto on CPU: the native decode kernel where it reads the pages, else the XLA path (and the
    engine reports that, not native); asking for native with 4-bit pages is an error."""
    assert select_attention_backend("auto", FORMATS[fmt], platform="cpu").name == impl
    if impl == "xla":
        with pytest.raises(ValueError, match="reads unpacked KV pages only"):
            select_attention_backend("native", FORMATS[fmt], platform="cpu")
