"""Scheduler: token budget, chunked prefill, seats, priorities, preemption, abort, prefix cache.

A fake paged "model" stands in for the runner: it writes each chunk's tokens into the pages the plan
names and samples token = (sum of every token it reads back from those pages) % 97 + 3. Wrong page
tables, wrong cache hits or a lossy preemption would therefore change the outputs, which are checked
against the same rule applied to plain lists.
"""
import math
import subprocess
import sys

import pytest

from jaxserve import SamplingParams
from jaxserve.core.block_manager import NULL_PAGE, BlockManager
from jaxserve.core.plan import RunnerOutput, SampledToken, StepPlan
from jaxserve.core.request import Request, RequestStatus
from jaxserve.core.scheduler import Scheduler
from jaxserve.errors import InvalidRequestError


def next_token(tokens) -> int:
    return sum(tokens) % 97 + 3


def expected_output(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def output_of(sampled: dict[str, int]) -> RunnerOutput:
    """What a runner returns: one accepted token per sampling request."""
    return RunnerOutput({rid: (SampledToken(token, 0.0, ()),) for rid, token in sampled.items()})


class FakePagedModel:
    def __init__(self, page_size):
        self.page_size = page_size
        self.kv = {}   # (page, slot) -> token

    def run(self, plan: StepPlan) -> RunnerOutput:
        sampled = {}
        for chunk in plan.chunks:
            end = chunk.start_position + len(chunk.token_ids)
            assert len(chunk.page_table) == math.ceil(end / self.page_size) and NULL_PAGE not in chunk.page_table
            for position, token in enumerate(chunk.token_ids, chunk.start_position):
                self.kv[self._slot(chunk.page_table, position)] = token
            if chunk.samples:
                sampled[chunk.request_id] = next_token(self.kv[self._slot(chunk.page_table, p)] for p in range(end))
        return output_of(sampled)

    def _slot(self, table, position):
        return table[position // self.page_size], position % self.page_size


class Harness:
    def __init__(self, num_pages=64, page_size=4, prefix_caching=True, **scheduler_kwargs):
        self.bm = BlockManager(num_pages, page_size, enable_prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.bm, **scheduler_kwargs)
        self.model = FakePagedModel(page_size)
        self.plans: list[StepPlan] = []
        self.finished: list[Request] = []

    def add(self, request_id, prompt, max_tokens=8, **kwargs):
        request = Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens), **kwargs)
        self.scheduler.add_request(request)
        return request

    def step(self) -> StepPlan:
        s = self.scheduler
        was_running = {r.request_id for r in s.running}
        plan = s.schedule()
        assert plan.num_tokens == sum(len(c.token_ids) for c in plan.chunks) <= s.max_num_batched_tokens
        assert len(plan.chunks) <= s.max_num_seqs and s.num_running <= s.max_num_seqs
        assert len({c.request_id for c in plan.chunks}) == len(plan.chunks)
        for request_id in plan.preempted_ids:
            preempted = s.get_request(request_id)
            assert preempted.status is RequestStatus.WAITING and preempted.num_computed_tokens == 0
        if plan.preempted_ids:   # pages just freed are not handed to waiting requests in the same step
            assert {c.request_id for c in plan.chunks} <= was_running
        for update in s.update(plan, self.model.run(plan)):
            if update.request.is_finished:
                self.finished.append(update.request)
        self.bm.check_invariants()
        self.plans.append(plan)
        return plan

    def run_all(self, max_steps=10_000):
        while self.scheduler.has_unfinished:
            assert len(self.plans) < max_steps, "scheduler does not make progress"
            self.step()
        assert self.bm.num_free_pages == self.bm.num_usable_pages
        return self.finished


def check_outputs(requests):
    for r in requests:
        assert r.status is RequestStatus.FINISHED_LENGTH, r.request_id
        assert r.output_token_ids == expected_output(r.prompt_token_ids, r.params.max_tokens), r.request_id


def test_budget_is_honoured_and_every_request_finishes_correctly():
    h = Harness(num_pages=256, page_size=4, max_num_batched_tokens=64)
    requests = [h.add(f"r{i}", [(i * 7 + j) % 50 for j in range(5 + 13 * i)], max_tokens=3 + i % 5)
                for i in range(12)]
    h.run_all()
    check_outputs(requests)
    assert max(p.num_tokens for p in h.plans) == 64
    assert sorted(r.request_id for r in h.finished) == sorted(r.request_id for r in requests)


def test_long_prompt_is_chunked_alone():
    h = Harness(num_pages=512, page_size=16, max_num_batched_tokens=128)
    long = h.add("long", [i % 31 for i in range(1000)], max_tokens=2)
    sizes = []
    while not long.output_token_ids:
        sizes.append(h.step().num_tokens)
    assert sizes == [128] * 7 + [104] and len(sizes) == math.ceil(1000 / 128)
    h.run_all()
    check_outputs([long])


def test_decodes_keep_flowing_during_a_chunked_prefill():
    h = Harness(num_pages=512, page_size=16, max_num_batched_tokens=128)
    decoders = [h.add(f"d{i}", [i + 1, 2, 3], max_tokens=40) for i in range(2)]
    h.step()                                    # both prefill (and sample) in one step
    long = h.add("long", [i % 31 for i in range(1000)], max_tokens=2)
    steps = 0
    while not long.output_token_ids:
        plan = h.step()
        steps += 1
        by_id = {c.request_id: c for c in plan.chunks}
        for d in decoders:                      # each step still decodes one token per decoder
            assert len(by_id[d.request_id].token_ids) == 1 and by_id[d.request_id].samples
        assert plan.num_tokens <= 128
    assert steps == math.ceil(1000 / 126) == math.ceil(1000 / 128)
    h.run_all()
    check_outputs(decoders + [long])


def test_long_prefill_threshold_caps_a_chunk():
    h = Harness(num_pages=128, page_size=4, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    h.add("a", range(40), max_tokens=1)
    h.add("b", range(3), max_tokens=1)
    plan = h.step()
    assert [len(c.token_ids) for c in plan.chunks] == [16, 3]


def test_max_num_seqs_is_honoured():
    h = Harness(num_pages=128, max_num_seqs=3)
    requests = [h.add(f"r{i}", [i, i + 1, i + 2], max_tokens=4) for i in range(10)]
    first = h.step()
    assert [c.request_id for c in first.chunks] == ["r0", "r1", "r2"]
    assert h.scheduler.num_waiting == 7
    h.run_all()                                 # Harness.step asserts the seat limit every step
    check_outputs(requests)


def test_lower_priority_value_first_and_fcfs_within_a_priority():
    h = Harness(num_pages=128, max_num_seqs=1)
    for request_id, priority in [("a1", 1), ("b0", 0), ("c1", 1), ("d0", 0), ("e2", 2)]:
        h.add(request_id, [1, 2, 3], max_tokens=2, priority=priority)
    h.run_all()
    assert [r.request_id for r in h.finished] == ["b0", "d0", "a1", "c1", "e2"]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_when_pages_run_out_still_gives_every_token(prefix_caching):
    h = Harness(num_pages=9, page_size=4, prefix_caching=prefix_caching)   # 8 pages for 4 x 5
    requests = [h.add(f"r{i}", [i * 10 + j for j in range(6)], max_tokens=12) for i in range(4)]
    h.run_all()
    assert any(p.preempted_ids for p in h.plans)
    assert sum(r.num_preemptions for r in requests) > 0
    check_outputs(requests)


def test_the_worst_priority_is_preempted_and_keeps_its_seed():
    h = Harness(num_pages=7, page_size=4)      # 6 pages; each request alone needs 5
    low = h.add("low", [5, 6, 7, 8], max_tokens=16, priority=1)
    high = h.add("high", [1, 2, 3, 4], max_tokens=16, priority=0)
    seeds = set()
    while h.scheduler.has_unfinished:
        plan = h.step()
        assert "high" not in plan.preempted_ids
        seeds |= {c.seed for c in plan.chunks if c.request_id == "low"}
    assert high.num_preemptions == 0 and low.num_preemptions > 0
    assert len(seeds) == 1                      # drawn once, reused after recompute
    check_outputs([low, high])


def test_a_step_that_preempts_admits_nobody():
    h = Harness(num_pages=7, page_size=4, max_num_seqs=2)   # 6 pages
    high = h.add("high", [1, 2, 3, 4], max_tokens=12, priority=0)
    low = h.add("low", [5, 6, 7, 8, 9, 10, 11, 12], max_tokens=12, priority=1)
    h.step()
    seated_later = h.add("later", [3], max_tokens=2, priority=0)   # waits for a seat
    preempting = []
    while h.scheduler.has_unfinished:
        plan = h.step()
        if plan.preempted_ids:
            preempting.append(plan)
    assert preempting and preempting[0].preempted_ids == ("low",)
    # Harness.step checks the preempting step only ran already-running requests; "later" came next.
    assert [c.request_id for c in h.plans[h.plans.index(preempting[0]) + 1].chunks] == ["high", "later"]
    check_outputs([high, low, seated_later])


def test_abort_frees_pages_waiting_or_running():
    h = Harness(num_pages=32, max_num_seqs=1)
    running = h.add("run", range(10), max_tokens=8)
    waiting = h.add("wait", range(10), max_tokens=8)
    plan = h.scheduler.schedule()
    assert h.bm.num_free_pages < h.bm.num_usable_pages
    assert h.scheduler.abort("run") and h.scheduler.abort("wait")
    assert running.status is waiting.status is RequestStatus.FINISHED_ABORTED
    assert running.finish_reason == "abort"
    assert not h.scheduler.abort("run") and not h.scheduler.abort("nope")
    assert h.scheduler.update(plan, output_of({"run": 7})) == []          # the stale chunk is ignored
    assert running.output_token_ids == [] and not h.scheduler.has_unfinished
    assert h.bm.num_free_pages == h.bm.num_usable_pages
    h.bm.check_invariants()


def test_finish_for_a_stop_string_frees_the_request():
    h = Harness(num_pages=32)
    request = h.add("a", range(5), max_tokens=8)
    h.step()
    h.scheduler.finish("a", RequestStatus.FINISHED_STOPPED)
    assert request.finish_reason == "stop" and h.scheduler.get_request("a") is None
    assert h.scheduler.num_running == 0 and h.bm.num_free_pages == h.bm.num_usable_pages
    h.scheduler.finish("a", RequestStatus.FINISHED_STOPPED)   # already gone: ignored


def test_eos_and_stop_token_ids_stop_unless_eos_is_ignored():
    first = next_token([1, 2, 3])
    h = Harness()
    eos = h.add("eos", [1, 2, 3], max_tokens=8, eos_token_ids={first})
    h.scheduler.add_request(Request("stop_id", [1, 2, 3], SamplingParams(max_tokens=8, stop_token_ids=(first,))))
    ignored = Request("ignore", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True), eos_token_ids={first})
    h.scheduler.add_request(ignored)
    finished = {r.request_id: r for r in h.run_all()}
    assert eos.status is finished["stop_id"].status is RequestStatus.FINISHED_STOPPED
    assert eos.output_token_ids == finished["stop_id"].output_token_ids == [first]
    assert ignored.finish_reason == "length" and len(ignored.output_token_ids) == 5


def test_second_request_reuses_a_cached_three_page_prefix():
    page_size = 4
    h = Harness(num_pages=64, page_size=page_size)
    shared = [7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9]    # three full pages
    first = h.add("first", shared + [3, 3], max_tokens=4)
    h.run_all()
    second = h.add("second", shared + [6, 6, 6], max_tokens=4)
    plan = h.step()
    assert second.num_cached_tokens == 3 * page_size
    (chunk,) = plan.chunks
    assert chunk.start_position == 12 and chunk.token_ids == (6, 6, 6)
    assert plan.num_tokens == 3 < second.num_prompt_tokens
    assert first.num_cached_tokens == 0
    h.run_all()
    check_outputs([first, second])


def test_history_is_sent_at_admission_of_penalised_requests():
    """The runner counts fed tokens itself; at admission it needs only what the prefix cache skipped."""
    h = Harness(max_num_batched_tokens=16)
    prefix = list(range(1, 13))  # three full pages of 4
    h.scheduler.add_request(Request("warm", prefix + [20], SamplingParams(max_tokens=1)))
    h.run_all()
    h.scheduler.add_request(Request("pen", prefix + [30], SamplingParams(max_tokens=3, repetition_penalty=1.2)))
    h.scheduler.add_request(Request("plain", prefix + [40], SamplingParams(max_tokens=3, logprobs=2)))
    first = {c.request_id: c for c in h.step().chunks}
    assert first["pen"].start_position == 12 and first["pen"].history == tuple(prefix)
    assert first["plain"].history == ()
    second = {c.request_id: c for c in h.step().chunks}
    assert second["pen"].history == ()  # running: nothing more to send
    assert first["pen"].num_prompt_tokens == 13


def test_explicit_seed_is_passed_through():
    h = Harness()
    h.scheduler.add_request(Request("s", [1, 2], SamplingParams(seed=1234)))
    assert h.step().chunks[0].seed == 1234


@pytest.mark.parametrize("prompt_len,max_tokens,field", [(33, 1, "prompt"), (30, 3, "max_tokens"), (0, 4, "prompt")])
def test_requests_that_can_never_fit_are_refused(prompt_len, max_tokens, field):
    h = Harness(num_pages=9, page_size=4)                   # 32 token slots
    with pytest.raises(InvalidRequestError, match=field):
        h.add("x", range(prompt_len), max_tokens=max_tokens)
    h.add("ok", range(28), max_tokens=4)
    with pytest.raises(InvalidRequestError, match="request_id"):
        h.add("ok", range(3))


def test_request_bookkeeping():
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=2), eos_token_ids=[9])
    assert request.status is RequestStatus.WAITING and not request.is_finished
    request.append_token(4)
    assert request.all_token_ids == [1, 2, 3, 4] and request.num_tokens == 4
    assert request.token_ids_between(2, 4) == [3, 4] and request.check_stop() is None
    request.append_token(5)
    assert request.check_stop() is RequestStatus.FINISHED_LENGTH
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert RequestStatus.RUNNING.finish_reason is None


def test_host_modules_never_import_jax():
    code = ("import sys, jaxserve.core.scheduler, jaxserve.core.block_manager, jaxserve.core.request, "
            "jaxserve.core.plan, jaxserve.core.detokenizer;"
            "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
