"""The paged Engine on the real SmolLM2: chunked batching, prefix cache, preemption, abort, no
recompilation, input validation, sampling features and incremental detokenization.

"Alone" means the request run by itself in an engine with prefix caching off; greedy outputs of
batched, cached, preempted or chunked runs must equal it token for token.
"""
import math
import random

import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.core.detokenizer import IncrementalDetokenizer
from jaxserve.engine import Engine, EngineConfig
from jaxserve.errors import InvalidRequestError

pytestmark = pytest.mark.slow
PAGE = 16


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def step_into(engine, outs):
    """One step; appends each delta to outs[request_id]. Returns the deltas."""
    deltas = engine.step()
    for d in deltas:
        assert not (outs.get(d.request_id) and outs[d.request_id][-1].finished), "delta after finish"
        outs.setdefault(d.request_id, []).append(d)
    return deltas


def drain(engine, outs=None):
    outs = {} if outs is None else outs
    while engine.has_unfinished():
        step_into(engine, outs)
    return outs


def tokens(deltas):
    return [t for d in deltas for t in d.new_token_ids]


def assert_clean(engine):
    assert not engine.has_unfinished()
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_pages == engine.block_manager.num_usable_pages


def run_one(engine, prompt, params):
    rid = engine.add_request(prompt, params)
    return drain(engine)[rid]


@pytest.fixture(scope="module")
def model(smollm2_model):
    return smollm2_model


@pytest.fixture(scope="module")
def alone(model):
    """alone(prompt_ids, max_tokens) -> greedy tokens, memoized; one request at a time, no prefix cache."""
    # The shared engine's shapes (so the same compiled steps), without the prefix cache.
    solo = Engine(model, EngineConfig(num_pages=512, max_num_seqs=16, max_num_batched_tokens=256,
                                      enable_prefix_caching=False))
    memo = {}

    def run(prompt, max_tokens):
        key = (tuple(prompt), max_tokens)
        if key not in memo:
            assert_clean(solo)
            memo[key] = tokens(run_one(solo, list(prompt), greedy(max_tokens)))
            assert len(memo[key]) == max_tokens
        return memo[key]

    return run


@pytest.fixture(scope="module")
def shared(model):
    engine = Engine(model, EngineConfig(num_pages=512, max_num_seqs=16, max_num_batched_tokens=256))
    yield engine
    assert_clean(engine)


@pytest.fixture(scope="module")
def workload():
    """32 (prompt ids, max_tokens): lengths spread over 1..1000 (log-uniform, so most are short)."""
    rng = np.random.default_rng(2024)
    lengths = [1, 1000, 500, 250] + [int(round(math.exp(x))) for x in rng.uniform(math.log(2), math.log(160), 28)]
    return [(rng.integers(100, 49000, n).tolist(), int(rng.integers(1, 11))) for n in lengths]


def random_prompt(n, seed):
    return np.random.default_rng(seed).integers(100, 49000, n).tolist()


def test_staggered_chunked_batch_matches_alone(shared, alone, workload):
    rng = random.Random(0)
    order = list(range(2, len(workload)))
    rng.shuffle(order)
    order[4:4] = [1, 0]  # the 1000-token prompt arrives fifth: the first four decode during its prefill
    ids, outs, interleaved = {}, {}, 0
    while order or shared.has_unfinished():
        for _ in range(rng.randint(0, 3) if ids else 4):
            if order:
                i = order.pop(0)
                ids[shared.add_request(workload[i][0], greedy(workload[i][1]))] = i
        long_rid = next((r for r, i in ids.items() if i == 1), None)
        deltas = step_into(shared, outs)
        long = shared.scheduler.get_request(long_rid) if long_rid else None
        if long is not None and 0 < long.num_computed_tokens < 1000 and any(d.new_token_ids for d in deltas):
            interleaved += 1
    assert interleaved >= 1, "no decode ran while the 1000-token prompt was being prefilled"
    assert len(outs) == len(workload)
    for rid, i in ids.items():
        prompt, n = workload[i]
        assert tokens(outs[rid]) == alone(prompt, n), f"request {i} ({len(prompt)} prompt tokens)"
        assert outs[rid][-1].finish_reason == "length" and outs[rid][-1].usage.prompt_tokens == len(prompt)
    assert_clean(shared)


def test_prefix_cache_hit_matches_cold(shared, alone, workload):
    long, n = workload[1]
    run_one(shared, long, greedy(n))  # cold, or warm from the test above
    warm = run_one(shared, long, greedy(n))
    assert tokens(warm) == alone(long, n)
    assert warm[-1].usage.cached_prompt_tokens == (len(long) - 1) // PAGE * PAGE  # 992
    # Same 300-token prefix, different suffix: only the 18 full pages of the prefix are shared.
    other = long[:300] + random_prompt(20, 1)
    hit = run_one(shared, other, greedy(6))
    assert tokens(hit) == alone(other, 6)
    assert hit[-1].usage.cached_prompt_tokens == 300 // PAGE * PAGE
    assert_clean(shared)


def test_preemption_gives_the_same_outputs(model, alone, workload):
    tight = Engine(model, EngineConfig(num_pages=12, max_num_seqs=8, max_num_batched_tokens=32))
    chosen = [w for w in workload if 16 <= len(w[0]) <= 128][:10]
    assert len(chosen) >= 6
    rids = [tight.add_request(p, greedy(n)) for p, n in chosen]
    requests = [tight.scheduler.get_request(r) for r in rids]
    outs = drain(tight)
    assert sum(r.num_preemptions for r in requests) > 0, "11 pages for 10 requests must preempt"
    for rid, (prompt, n) in zip(rids, chosen):
        assert tokens(outs[rid]) == alone(prompt, n), f"{len(prompt)} prompt tokens"
    assert_clean(tight)
    assert tight.block_manager.num_cached_pages > 0  # freed pages stay findable


def test_abort_waiting_and_running_frees_every_page(shared, alone, workload):
    survivors = [w for w in workload if 2 <= len(w[0]) <= 40][:3]
    decoding = shared.add_request(random_prompt(20, 2), greedy(50))
    prefilling = shared.add_request(random_prompt(700, 3), greedy(5))
    waiting = shared.add_request(random_prompt(30, 4), greedy(5))
    kept = {shared.add_request(p, greedy(n)): (p, n) for p, n in survivors}
    outs = {}
    step_into(shared, outs)
    status = {r: shared.scheduler.get_request(r).status.value for r in (decoding, prefilling, waiting)}
    assert status == {decoding: "running", prefilling: "running", waiting: "waiting"}
    assert 0 < shared.scheduler.get_request(prefilling).num_computed_tokens < 700
    assert shared.abort(waiting) and shared.abort(prefilling)
    step_into(shared, outs)
    assert len(tokens(outs[decoding])) >= 1
    assert shared.abort(decoding)
    assert not shared.abort(decoding) and not shared.abort("no-such-request")
    drain(shared, outs)
    for rid in (decoding, prefilling, waiting):
        assert outs[rid][-1].finished and outs[rid][-1].finish_reason == "abort"
        assert outs[rid][-1].new_token_ids == ()
    for rid, (p, n) in kept.items():
        assert tokens(outs[rid]) == alone(p, n)
    assert_clean(shared)


def test_no_recompilation_on_random_workload(shared):
    rng = random.Random(11)
    before, outs, params = shared.compile_count, {}, {}
    pending = []
    for i in range(40):
        n = 300 if i in (5, 23) else int(math.exp(rng.uniform(0, math.log(200))))
        prompt = random_prompt(n, 100 + i) if i % 4 else " ".join(["word"] * max(1, n // 2))
        pending.append((prompt, SamplingParams(
            max_tokens=rng.randint(1, 16), temperature=rng.choice([0.0, 0.7, 1.0, 1.3]),
            top_p=rng.choice([1.0, 0.9, 0.5]), top_k=rng.choice([0, -1, 1, 20]), min_p=rng.choice([0.0, 0.05, 0.2]),
            repetition_penalty=rng.choice([1.0, 1.2]), presence_penalty=rng.choice([0.0, 0.5, -0.5]),
            frequency_penalty=rng.choice([0.0, 0.3]), logprobs=rng.choice([None, 0, 3, 20]),
            seed=rng.choice([None, rng.randrange(2**31)]), stop=rng.choice([(), ("the",), (".", "\n")]),
            ignore_eos=rng.random() < 0.5), rng.choice([0, 0, 1, -1])))
    aborted = set()
    while pending or shared.has_unfinished():
        for _ in range(rng.randint(0, 4)):
            if pending:
                prompt, p, prio = pending.pop(0)
                rid = shared.add_request(prompt, p, priority=prio)
                params[rid] = p
        step_into(shared, outs)
        if rng.random() < 0.08 and shared.scheduler.running:
            victim = rng.choice(shared.scheduler.running).request_id
            assert shared.abort(victim)
            aborted.add(victim)
    assert shared.compile_count == before == len(shared.runner.buckets)  # nothing beyond warm-up, ever
    assert set(outs) == set(params) and aborted
    for rid, deltas in outs.items():
        p, last, n = params[rid], outs[rid][-1], len(tokens(deltas))
        assert last.finished
        assert last.finish_reason == "abort" if rid in aborted else last.finish_reason in ("stop", "length")
        assert n <= p.max_tokens and (last.finish_reason != "length" or n == p.max_tokens)
        text = "".join(d.text for d in deltas)
        assert not any(s in text for s in p.stop)
        for d in deltas:
            if d.new_token_ids:
                assert (d.logprobs is not None) == (p.logprobs is not None)
                assert d.logprobs is None or len(d.logprobs[0].top_logprobs) == p.logprobs
    assert_clean(shared)


def test_bad_input_is_refused_and_running_request_unharmed(shared, alone, workload):
    prompt, n = next(w for w in workload if 20 <= len(w[0]) <= 60)
    good = shared.add_request(prompt, greedy(n + 2), request_id="good")
    outs = {}
    step_into(shared, outs)
    vocab, ctx, kv = shared.model.config.vocab_size, shared.max_model_len, shared.max_cached_tokens
    assert kv < ctx  # so the two checks below are distinct
    cases = [("", None, "prompt"), ([], None, "prompt"), ([5, vocab], None, "prompt token ids"),
             ([5, -1], None, "prompt token ids"), ([5, "a"], None, "prompt token ids"),
             ([7] * ctx, None, "prompt"), ([7] * 100, greedy(ctx - 99), "max_tokens"),
             ([7] * (kv + 1), greedy(1), "KV cache"), ([7] * 100, greedy(kv - 99), "max_tokens"),
             ([7] * 10, greedy(1), "request_id")]
    for bad_prompt, params, field in cases:
        with pytest.raises(InvalidRequestError, match=field):
            shared.add_request(bad_prompt, params, request_id="good" if field == "request_id" else None)
    with pytest.raises(InvalidRequestError, match="priority"):
        shared.add_request([5], greedy(1), priority="high")
    for field, value in [("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.5), ("top_p", 1.5),
                         ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0),
                         ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("logprobs", 21),
                         ("seed", -1), ("temperature", float("nan")), ("stop", ("",))]:
        with pytest.raises(InvalidRequestError, match=field):
            shared.add_request([5], SamplingParams(**{field: value}))
    assert shared.scheduler.num_waiting + shared.scheduler.num_running == 1
    drain(shared, outs)
    assert tokens(outs[good]) == alone(prompt, n + 2)
    assert_clean(shared)


def test_seeded_sampling_is_reproducible_in_any_batch(shared):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    first = tokens(run_one(shared, "Once upon a time", p))
    company = [shared.add_request("The weather today", SamplingParams(max_tokens=20, seed=5)),
               shared.add_request("1 1 1 1", greedy(15, repetition_penalty=1.3, logprobs=2))]
    outs = {}
    step_into(shared, outs)
    rid = shared.add_request("Once upon a time", p)
    drain(shared, outs)
    assert tokens(outs[rid]) == first and all(outs[c][-1].finished for c in company)
    assert tokens(run_one(shared, "Once upon a time", SamplingParams(
        max_tokens=12, temperature=1.0, top_p=0.9, seed=1235, ignore_eos=True))) != first
    # Filters that keep only the top token make sampling greedy.
    plain = tokens(run_one(shared, "Once upon a time", greedy(10)))
    for filt in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-4}):
        assert tokens(run_one(shared, "Once upon a time", SamplingParams(
            max_tokens=10, temperature=1.5, ignore_eos=True, seed=3, **filt))) == plain, filt
    assert len(tokens(run_one(shared, "Once upon a time", SamplingParams(
        max_tokens=10, temperature=1.0, min_p=0.1, top_k=40, ignore_eos=True)))) == 10


def test_stop_strings_and_stop_tokens(shared):
    full = run_one(shared, "The capital of France is", greedy(16))
    text, ids = "".join(d.text for d in full), tokens(full)
    word = text.split()[len(text.split()) // 2]
    cut = text.index(word)
    assert cut > 0
    out = run_one(shared, "The capital of France is", greedy(16, stop=("zzzz", word)))
    assert "".join(d.text for d in out) == text[:cut]
    assert out[-1].finish_reason == "stop" and len(tokens(out)) < 16
    out = run_one(shared, "The capital of France is", greedy(16, stop_token_ids=(ids[3],)))
    assert tokens(out) == ids[:ids.index(ids[3]) + 1] and out[-1].finish_reason == "stop"


def test_logprobs(shared):
    for params in (greedy(6, logprobs=5), SamplingParams(max_tokens=6, temperature=1.0, seed=9, logprobs=5)):
        out = run_one(shared, "The three primary colors are", params)
        for d in out:
            (s,) = d.logprobs
            top = s.top_logprobs
            assert s.token_id == d.new_token_ids[0] and s.logprob <= 0 and len(top) == 5
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            assert s.logprob <= top[0][1] + 1e-5 and all(lp <= 0 for _, lp in top)
            if s.token_id in dict(top):
                assert s.logprob == pytest.approx(dict(top)[s.token_id], abs=1e-5)
            if params.greedy:
                assert top[0][0] == s.token_id
    d = run_one(shared, "Hi", greedy(1, logprobs=0))[-1]
    assert d.logprobs[0].top_logprobs == () and d.logprobs[0].logprob <= 0


def test_repetition_penalty(shared):
    loop = shared.tokenizer.encode("1 1 1 1 1 1 1 1")
    plain = tokens(run_one(shared, loop, greedy(10)))
    assert all(t in loop for t in plain), "the unpenalized continuation repeats the prompt"
    penalized = tokens(run_one(shared, loop, greedy(10, repetition_penalty=1.3)))
    assert sum(t in loop for t in penalized) < len(plain) // 2
    # The penalty must also see prompt tokens served from the prefix cache: the word to copy
    # sits only in the first (cached) pages.
    prompt = shared.tokenizer.encode("The secret word is Zanzibar. " + "Remember it well. " * 6 + "The secret word is")
    cold = run_one(shared, prompt, greedy(6, repetition_penalty=1.3))
    assert cold[-1].usage.cached_prompt_tokens == 0
    rid = shared.add_request(prompt, greedy(6, repetition_penalty=1.3))
    other = shared.add_request(prompt, greedy(6))
    outs = drain(shared)
    assert outs[rid][-1].usage.cached_prompt_tokens == 32
    assert tokens(outs[rid]) == tokens(cold)
    assert "Zanzibar" in "".join(d.text for d in outs[other]) and tokens(outs[other]) != tokens(cold)


def test_incremental_detokenizer_multibyte(model):
    tok = model.tokenizer
    for text in ["héllo wörld 你好 🙂", "晨走走走, 昌赏走 👏👏 naïve café"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # characters do span tokens
        detok = IncrementalDetokenizer(tok, tok.encode("Say:"))
        pieces = [detok.add(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)


# A character cut off by max_tokens must still be emitted: the detokenizer flushes at finish.
def test_delta_texts_concatenate_to_the_decoded_output(shared):
    for msg in ["请用中文回答：你好吗？", "Translate to Chinese: good morning"]:
        shared.add_request(shared.tokenizer.encode_chat([{"role": "user", "content": msg}]), greedy(24))
    for deltas in drain(shared).values():
        assert "".join(d.text for d in deltas) == shared.tokenizer.decode(tokens(deltas))
