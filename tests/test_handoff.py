"""Scheduler side of disaggregated serving: a prefill scheduler exports a request after its first
token (pages pinned until released, exactly once); a decode scheduler imports it (seat and pages
reserved, or a clean refusal), writes the arrived pages through the plan and decodes on.

The fake paged model of test_scheduler.py stands in for both runners; a transfer copies the
prefill side's page contents, so a wrong page table, a wrong first page or a lost page changes the
outputs, which are compared with the colocated rule.
"""
import pytest

from jaxserve import SamplingParams
from jaxserve.core.request import Request, RequestStatus
from test_scheduler import FakePagedModel, Harness, expected_output


class DecodeModel(FakePagedModel):
    """Writes each plan's page imports (from `payloads`) before running its chunks."""

    def __init__(self, page_size):
        super().__init__(page_size)
        self.payloads: dict[str, list[dict[int, int]]] = {}  # request id -> per page {slot: token}
        self.written: list[tuple[str, int, int]] = []         # (request id, first page, pages written)

    def run(self, plan):
        for imp in plan.imports:
            pages = self.payloads.pop(imp.request_id)
            for i, page in enumerate(imp.page_ids, imp.first_page):
                for slot, token in pages[i].items():
                    self.kv[page, slot] = token
            self.written.append((imp.request_id, imp.first_page, len(imp.page_ids)))
        return super().run(plan)


def prefill_until_exported(h: Harness, requests):
    """Steps the prefill side until every request is exported; returns their payloads."""
    while any(r.status is not RequestStatus.EXPORTED for r in requests):
        h.step()
    return {r.request_id: payload(h, r) for r in requests}


def payload(h: Harness, request):
    ps = h.bm.page_size
    table = h.bm.page_table(request.request_id)[:h.bm.pages_needed(request.num_computed_tokens)]
    return [{s: h.model.kv[p, s] for s in range(ps) if (p, s) in h.model.kv} for p in table]


def imported(request: Request) -> Request:
    """What the decode side rebuilds from an export's state."""
    return Request(request.request_id, request.prompt_token_ids, request.params,
                   output_token_ids=list(request.output_token_ids), sampling_seed=request.sampling_seed,
                   num_cached_tokens=request.num_cached_tokens)


def decode_harness(num_pages=64, page_size=4, **kwargs) -> Harness:
    h = Harness(num_pages=num_pages, page_size=page_size, **kwargs)
    h.model = DecodeModel(page_size)
    return h


def test_export_pins_pages_until_released_exactly_once():
    p = Harness(num_pages=32, page_size=4, max_num_batched_tokens=8)
    r = p.add("a", list(range(1, 11)), max_tokens=5, export=True)
    prefill_until_exported(p, [r])
    assert r.output_token_ids == expected_output(r.prompt_token_ids, 1)
    assert not p.scheduler.has_unfinished and p.scheduler.num_running == 0
    assert p.bm.num_free_pages == p.bm.num_usable_pages - 3   # 10 prompt tokens + 1 sampled, KV for 10
    assert p.scheduler.release_export("a") and not p.scheduler.release_export("a")
    p.bm.check_invariants()
    assert p.bm.num_free_pages == p.bm.num_usable_pages
    assert p.scheduler.schedule().finished_ids == ("a",)      # the runner's row goes after export, once


def test_a_request_finished_by_its_first_token_is_not_exported():
    p = Harness(num_pages=32, page_size=4)
    r = p.add("a", [1, 2, 3], max_tokens=1, export=True)
    p.run_all()
    assert r.status is RequestStatus.FINISHED_LENGTH and not p.scheduler.exported


@pytest.mark.parametrize("prefix_hit", [False, True])
def test_imported_requests_decode_exactly_as_colocated(prefix_hit):
    p = Harness(num_pages=64, page_size=4, max_num_batched_tokens=16)
    d = decode_harness(num_pages=64, page_size=4, max_num_seqs=8)
    shared = list(range(20, 33))                                # 13 tokens: 3 full pages
    if prefix_hit:   # the decode side already holds the shared prefix's pages in its cache
        d.add("warm", shared + [1], max_tokens=2)
        d.run_all()
    prompts = {f"r{i}": shared + [40 + i] * (i + 1) for i in range(4)}
    exported = [p.add(rid, prompt, max_tokens=6, export=True) for rid, prompt in prompts.items()]
    payloads = prefill_until_exported(p, exported)
    for r in exported:
        assert d.scheduler.add_import(imported(r))
        d.model.payloads[r.request_id] = payloads[r.request_id]
        d.scheduler.mark_arrived(r.request_id)
        assert p.scheduler.release_export(r.request_id)
    finished = d.run_all()
    assert {r.request_id: r.output_token_ids for r in finished if r.request_id in prompts} == {
        rid: expected_output(prompt, 6) for rid, prompt in prompts.items()}
    assert p.bm.num_free_pages == p.bm.num_usable_pages
    first_pages = {first for rid, first, _ in d.model.written}
    assert first_pages == ({3} if prefix_hit else {0})


def test_import_waits_for_arrival_and_refuses_cleanly_when_full():
    d = decode_harness(num_pages=8, page_size=4, max_num_seqs=2)    # 7 usable pages
    big = Request("big", list(range(1, 22)), SamplingParams(max_tokens=4), output_token_ids=[5], sampling_seed=1)
    assert d.scheduler.add_import(big)                               # 22 tokens: 6 pages
    free_before = d.bm.num_free_pages
    other = Request("x", list(range(1, 9)), SamplingParams(max_tokens=4), output_token_ids=[5], sampling_seed=1)
    assert not d.scheduler.add_import(other)                         # 3 pages needed, 1 free
    assert d.bm.num_free_pages == free_before and d.scheduler.get_request("x") is None
    d.bm.check_invariants()
    plan = d.step()                                                  # not arrived: nothing runs
    assert plan.is_empty and big.status is RequestStatus.RECEIVING
    assert d.scheduler.has_unfinished


def test_abort_and_fallback_of_a_receiving_request_free_its_pages():
    d = decode_harness(num_pages=16, page_size=4)
    prompt = list(range(1, 12))
    first = expected_output(prompt, 1)
    a = Request("a", prompt, SamplingParams(max_tokens=5), output_token_ids=first, sampling_seed=3)
    b = Request("b", prompt, SamplingParams(max_tokens=5), output_token_ids=first, sampling_seed=3)
    assert d.scheduler.add_import(a) and d.scheduler.add_import(b)
    assert d.scheduler.abort("a") and a.status is RequestStatus.FINISHED_ABORTED
    assert d.scheduler.fall_back_to_recompute("b") and not d.scheduler.fall_back_to_recompute("b")
    assert d.scheduler.num_import_fallbacks == 1
    finished = d.run_all()                                           # b prefills here instead
    assert b.output_token_ids == expected_output(prompt, 5) and b in finished
    assert not d.model.written


def test_an_import_preempted_in_its_arrival_step_is_not_written():
    d = decode_harness(num_pages=5, page_size=4, max_num_seqs=4)    # 4 usable pages
    run = d.add("run", list(range(1, 9)), max_tokens=4)              # 8 prompt tokens: 2 pages
    d.step()                                                         # its next token needs a 3rd page
    prompt = list(range(30, 37))
    imp = Request("imp", prompt, SamplingParams(max_tokens=3), output_token_ids=expected_output(prompt, 1),
                  sampling_seed=2, priority=1)
    assert d.scheduler.add_import(imp) and d.bm.num_free_pages == 0  # 8 tokens: the last 2 pages
    d.scheduler.mark_arrived("imp")
    plan = d.step()     # imp is promoted, then preempted for run's page: its KV is not written
    assert plan.preempted_ids == ("imp",) and plan.imports == ()
    finished = d.run_all()                                           # imp recomputes here
    assert {r.request_id for r in finished} == {"run", "imp"} and not d.model.written
    assert imp.output_token_ids == expected_output(prompt, 3)
    assert run.output_token_ids == expected_output(run.prompt_token_ids, 4)


def test_receiving_imports_hold_their_seats():
    d = decode_harness(num_pages=64, page_size=4, max_num_seqs=2)
    d.add("a", [1, 2, 3], max_tokens=8)
    d.step()
    prompt = list(range(10, 15))
    c = Request("c", prompt, SamplingParams(max_tokens=4), output_token_ids=expected_output(prompt, 1), sampling_seed=1)
    assert d.scheduler.add_import(c)                         # 1 running + 1 receiving: the engine is full
    late = d.add("late", [4, 5, 6], max_tokens=2)
    d.step()
    assert late.status is RequestStatus.WAITING             # no seat while c's KV is on the way
    d.model.payloads["c"] = [{i: t for i, t in enumerate(prompt[:4])}, {0: prompt[4]}]
    d.scheduler.mark_arrived("c")
    while d.scheduler.has_unfinished:
        d.step()
        assert d.scheduler.num_running <= 2
    assert c.output_token_ids == expected_output(prompt, 4)


def test_an_import_whose_first_chunk_waits_for_budget_still_sends_its_history():
    d = decode_harness(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    d.add("long", list(range(1, 30)), max_tokens=2)           # takes the whole budget for a few steps
    d.step()
    prompt = [7, 8, 9]
    params = SamplingParams(max_tokens=3, repetition_penalty=1.2)
    imp = Request("imp", prompt, params, output_token_ids=expected_output(prompt, 1), sampling_seed=1, priority=1)
    assert d.scheduler.add_import(imp)
    d.model.payloads["imp"] = [{0: 7, 1: 8, 2: 9}]
    d.scheduler.mark_arrived("imp")
    firsts = []
    while d.scheduler.has_unfinished:
        plan = d.step()
        firsts += [c for c in plan.chunks if c.request_id == "imp"][:1]
    assert firsts[0].history == tuple(prompt)               # sent with its first chunk, whichever step that was
