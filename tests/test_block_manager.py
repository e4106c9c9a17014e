"""BlockManager: page ownership, ref counts, chained prefix caching, LRU eviction, invariants."""
import copy
import random

import pytest

from jaxserve import SamplingParams
from jaxserve.core.block_manager import NULL_PAGE, BlockManager
from jaxserve.core.request import Request

_ids = iter(range(10**9))


def make_request(tokens, request_id=None):
    return Request(request_id or f"r{next(_ids)}", list(tokens), SamplingParams(max_tokens=8))


def compute(bm, request, num_new=None):
    """What a scheduled step does to the block manager: allocate, 'compute', register full pages."""
    if num_new is None:
        num_new = request.num_tokens - bm.lookup_prefix(request) if not bm.page_table(request.request_id) \
            else request.num_tokens - request.num_computed_tokens
    assert bm.allocate(request, num_new)
    request.num_computed_tokens += num_new
    bm.cache_full_pages(request)


def test_allocate_and_free_track_pages_and_ref_counts():
    bm = BlockManager(num_pages=9, page_size=4)
    assert (bm.num_usable_pages, bm.num_free_pages, bm.usage) == (8, 8, 0.0)
    req = make_request(range(10))
    assert bm.allocate(req, 10)
    table = bm.page_table(req.request_id)
    assert len(table) == 3 and NULL_PAGE not in table and len(set(table)) == 3
    assert [bm.ref_count(p) for p in table] == [1, 1, 1]
    assert bm.num_free_pages == 5 and bm.usage == pytest.approx(3 / 8)
    bm.check_invariants()
    # Growing within the last page takes nothing; crossing a boundary takes exactly one page.
    req.num_computed_tokens = 10
    assert bm.allocate(req, 2) and len(bm.page_table(req.request_id)) == 3
    req.num_computed_tokens = 12
    assert bm.allocate(req, 1) and bm.page_table(req.request_id)[:3] == table
    assert bm.num_free_pages == 4
    bm.free(req.request_id)
    assert bm.page_table(req.request_id) == [] and bm.num_free_pages == 8
    bm.free("never-seen")  # harmless
    bm.check_invariants()


def test_full_pages_are_shared_and_partial_pages_are_not():
    bm = BlockManager(num_pages=32, page_size=4)
    first = make_request(range(10))          # pages [0..3] [4..7] full, [8, 9] partial
    compute(bm, first)
    assert bm.num_cached_pages == 2
    second = make_request(list(range(10)) + [50, 51])
    assert bm.lookup_prefix(second) == 8     # the partial third page is never shared
    assert bm.allocate(second, second.num_tokens - 8)
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8
    shared = bm.page_table(first.request_id)[:2]
    assert bm.page_table(second.request_id)[:2] == shared
    assert bm.page_table(second.request_id)[2] != bm.page_table(first.request_id)[2]
    assert [bm.ref_count(p) for p in shared] == [2, 2]
    bm.check_invariants()
    bm.free(first.request_id)
    assert [bm.ref_count(p) for p in shared] == [1, 1]
    bm.check_invariants()


def test_sharing_is_chained_on_the_whole_prefix():
    bm = BlockManager(num_pages=32, page_size=4)
    compute(bm, make_request([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second page after a different first page: not a hit.
    assert bm.lookup_prefix(make_request([0, 0, 0, 0, 5, 6, 7, 8, 9])) == 0
    # Same first page, different second: only the first is a hit.
    assert bm.lookup_prefix(make_request([1, 2, 3, 4, 5, 6, 7, 0, 9])) == 4
    # A fully cached prompt still leaves its last token to compute (rounded down to a page).
    assert bm.lookup_prefix(make_request([1, 2, 3, 4, 5, 6, 7, 8])) == 4
    assert bm.lookup_prefix(make_request([1, 2, 3, 4, 5, 6, 7, 8, 9])) == 8


def test_pages_full_of_generated_tokens_are_cached():
    bm = BlockManager(num_pages=32, page_size=4)
    req = make_request([1, 2, 3])
    compute(bm, req)
    for token in (4, 5, 6, 7, 8):            # decode: sample, append, feed it next step
        req.append_token(token)
        compute(bm, req, 1)
    assert bm.num_cached_pages == 2          # [1,2,3,4] and [5,6,7,8] hold generated tokens
    assert bm.lookup_prefix(make_request([1, 2, 3, 4, 5, 6, 7, 8, 9])) == 8


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_pages=32, page_size=4, enable_prefix_caching=False)
    compute(bm, make_request(range(12)))
    assert bm.num_cached_pages == 0 and bm.lookup_prefix(make_request(range(12))) == 0


def test_eviction_is_lru_tail_first_and_uncached_pages_go_first():
    bm = BlockManager(num_pages=7, page_size=2)   # 6 usable pages
    a, b = make_request([1, 2, 3, 4, 5]), make_request([11, 12, 13, 14, 15])
    compute(bm, a)
    compute(bm, b)
    assert bm.num_free_pages == 0 and bm.num_cached_pages == 4
    a_pages, b_pages = bm.page_table(a.request_id), bm.page_table(b.request_id)
    bm.free(a.request_id)
    bm.free(b.request_id)
    # Partial (uncached) pages are reused before any cached page is evicted.
    c = make_request([90, 91, 92])
    assert bm.allocate(c, 3)
    assert sorted(bm.page_table(c.request_id)) == sorted([a_pages[2], b_pages[2]])
    assert bm.num_cached_pages == 4
    # Next come a's pages (freed earlier than b's), its tail page before its head page.
    d = make_request([80])
    assert bm.allocate(d, 1) and bm.page_table(d.request_id) == [a_pages[1]]
    assert bm.lookup_prefix(make_request([1, 2, 3, 4, 5])) == 2
    e = make_request([70])
    assert bm.allocate(e, 1) and bm.page_table(e.request_id) == [a_pages[0]]
    assert bm.lookup_prefix(make_request([1, 2, 3, 4, 5])) == 0
    assert bm.lookup_prefix(make_request([11, 12, 13, 14, 15])) == 4
    bm.check_invariants()


def test_reusing_a_cached_page_makes_it_recently_used():
    bm = BlockManager(num_pages=5, page_size=2)   # 4 usable pages
    a, b = make_request([1, 2, 3]), make_request([11, 12, 13])
    compute(bm, a)
    compute(bm, b)
    bm.free(a.request_id)
    bm.free(b.request_id)
    a_again = make_request([1, 2, 3])
    compute(bm, a_again)                      # revives a's first page from the free queue
    assert a_again.num_cached_tokens == 2
    bm.free(a_again.request_id)
    # Now b's cached page is the least recently used one: it is evicted first.
    fresh = make_request([60, 61, 62, 63, 64, 65])
    assert bm.allocate(fresh, 6)
    assert bm.lookup_prefix(make_request([11, 12, 13])) == 0
    assert bm.lookup_prefix(make_request([1, 2, 3])) == 2
    bm.check_invariants()


def snapshot(bm, *requests):
    return copy.deepcopy((vars(bm), [vars(r) for r in requests]))


def test_failed_allocation_changes_nothing():
    bm = BlockManager(num_pages=6, page_size=4)   # 5 usable pages
    holder = make_request(range(8))
    compute(bm, holder)                           # 2 pages, both cached
    bm.free(holder.request_id)
    big = make_request(range(8))
    compute(bm, big, 4)
    other = make_request(list(range(8)) + list(range(100, 116)))   # hits 2 pages, needs 4 more
    bm.lookup_prefix(other)   # memoises hashes; a failed allocate must not add more than that
    before = snapshot(bm, big, other)
    assert not bm.allocate(other, other.num_tokens - 8)
    assert not bm.allocate(big, 100)
    assert snapshot(bm, big, other) == before
    assert other.num_computed_tokens == 0 and other.num_cached_tokens == 0
    bm.check_invariants()


def test_random_walk_keeps_invariants_and_shared_pages_hold_the_right_tokens():
    rng = random.Random(1234)
    page_size = 4
    bm = BlockManager(num_pages=40, page_size=page_size)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(5)]
    kv = {}            # page -> {slot: token}: what a model would have written into the cache
    live = []
    for op in range(3000):
        roll = rng.random()
        if roll < 0.3 or not live:
            req = make_request(rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 8))])
            cached = bm.lookup_prefix(req)
            num_new = min(req.num_tokens - cached, rng.randrange(1, 12))
            if bm.allocate(req, num_new):
                assert req.num_computed_tokens == cached == req.num_cached_tokens
                check_cached_pages_hold(bm, kv, req)
                live.append(req)
                step(bm, kv, req, num_new)
        elif roll < 0.8:
            req = rng.choice(live)
            decoding = req.num_computed_tokens == req.num_tokens
            if decoding:                                    # feed a newly sampled token
                req.append_token(rng.randrange(50))
            num_new = min(req.num_tokens - req.num_computed_tokens, rng.randrange(1, 12))
            if bm.allocate(req, num_new):
                step(bm, kv, req, num_new)
            elif decoding:
                req.output_token_ids.pop()                  # never fed; keep computed == num_tokens
        else:
            req = live.pop(rng.randrange(len(live)))
            bm.free(req.request_id)
        bm.check_invariants()
    for req in live:
        bm.free(req.request_id)
    bm.check_invariants()
    assert bm.num_free_pages == bm.num_usable_pages


def step(bm, kv, req, num_new):
    """'Compute' num_new tokens: write them into the request's pages, which it must own alone."""
    table = bm.page_table(req.request_id)
    assert len(table) >= bm.pages_needed(req.num_computed_tokens + num_new)
    start = req.num_computed_tokens
    for pos in range(start, start + num_new):
        page = table[pos // bm.page_size]
        assert bm.ref_count(page) == 1, "writing into a shared page"
        kv.setdefault(page, {})[pos % bm.page_size] = req.all_token_ids[pos]
    req.num_computed_tokens = start + num_new
    bm.cache_full_pages(req)


def check_cached_pages_hold(bm, kv, req):
    table = bm.page_table(req.request_id)
    for pos in range(req.num_computed_tokens):
        assert kv[table[pos // bm.page_size]][pos % bm.page_size] == req.all_token_ids[pos]
