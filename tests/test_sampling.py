"""Sampling parameters and the on-device sampler, then sampling through the real model."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.ops.sampling import PenaltyState, SamplingInputs, greedy, sample
from jaxserve.errors import InvalidRequestError


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5), ("seed", -1),
    ("stop", [""]), ("stop_token_ids", [-4]),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})


def sampling_inputs(n, counts=None, **params) -> tuple[SamplingInputs, PenaltyState]:
    p = SamplingParams(**params)
    col = lambda v, dtype=jnp.float32: jnp.full(n, v, dtype)  # noqa: E731
    inputs = SamplingInputs(col(p.temperature), col(max(p.top_k, 0), jnp.int32), col(p.top_p), col(p.min_p),
                            col(p.repetition_penalty), col(p.presence_penalty), col(p.frequency_penalty),
                            col(p.seed or 0, jnp.int32), jnp.arange(n, dtype=jnp.int32),
                            col(0 if counts is not None else 1, jnp.int32))
    counts = jnp.zeros((1, 4), jnp.int32) if counts is None else jnp.asarray([counts], jnp.int32)
    return inputs, PenaltyState(jnp.zeros_like(counts, jnp.int8), counts)


def draws(logits_row, n=4000, counts=None, **params):
    """n independent draws from one logits row: n rows, each with its own position in the key."""
    logits = jnp.tile(jnp.asarray(logits_row, jnp.float32), (n, 1))
    packed = sample(logits, *sampling_inputs(n, counts, **params), jnp.bool_(False))
    return np.asarray(packed[:, 0]).astype(int)


LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.1]))


def test_temperature_one_follows_the_softmax():
    freq = np.bincount(draws(LOGITS, temperature=1.0, seed=1), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.03)


def test_top_k_and_top_p_cut_the_tail():
    assert set(draws(LOGITS, temperature=1.0, top_k=2, seed=2)) == {0, 1}
    # mass before token 2 is 0.75 >= top_p=0.7, so only tokens 0 and 1 remain
    assert set(draws(LOGITS, temperature=1.0, top_p=0.7, seed=3)) == {0, 1}
    freq = np.bincount(draws(LOGITS, temperature=1.0, top_k=2, seed=4), minlength=4) / 4000
    np.testing.assert_allclose(freq[:2], [2 / 3, 1 / 3], atol=0.03)


def test_min_p_drops_unlikely_tokens():
    # min_p=0.4: tokens need p >= 0.4 * 0.5 = 0.2, so tokens 0 and 1 remain
    assert set(draws(LOGITS, temperature=1.0, min_p=0.4, seed=6)) == {0, 1}


def test_penalties_follow_vllm_rules():
    # token 0 generated 3 times: frequency 0.5 costs 1.5, presence 1.0 costs 1 more
    assert set(draws(LOGITS, n=32, counts=[3, 0, 0, 0], temperature=0.0, frequency_penalty=0.5,
                     presence_penalty=1.0)) == {1}
    # repetition 3.0 divides token 0's positive logit... here all logits are negative: multiplied
    assert set(draws(LOGITS, n=32, counts=[1, 0, 0, 0], temperature=0.0, repetition_penalty=3.0)) == {1}
    assert set(draws(LOGITS, n=32, counts=[1, 0, 0, 0], temperature=0.0, repetition_penalty=1.1)) == {0}


def test_logprobs_are_of_the_raw_distribution():
    logits = jnp.asarray([LOGITS], jnp.float32)
    packed = np.asarray(sample(logits, *sampling_inputs(1, temperature=0.0), jnp.bool_(True)))[0]
    assert packed[0] == 0 and np.isclose(packed[1], np.log(0.5), atol=1e-5)
    np.testing.assert_allclose(packed[2:6], [0, 1, 2, 3])
    np.testing.assert_allclose(packed[22:26], np.log([0.5, 0.25, 0.15, 0.1]), atol=1e-5)


def test_greedy_and_low_temperature():
    assert set(draws(LOGITS, n=64, temperature=0.0)) == {0}
    assert set(draws(LOGITS, n=256, temperature=0.01, seed=5)) == {0}


@pytest.mark.parametrize("vocab", [1000, 1024])  # padded to whole blocks, and not
def test_greedy_matches_argmax_with_ties_and_masked_rows(vocab):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, vocab)).astype(np.float32)
    logits[3, [7, 400, 999]] = 9.0  # ties (in different blocks): the first wins
    logits[6, [130, 131]] = 9.0  # ties in one block
    logits[4] = -np.inf
    logits[4, 512] = 0.0
    logits[5] = np.round(logits[5])  # many ties
    np.testing.assert_array_equal(np.asarray(greedy(jnp.asarray(logits))), np.argmax(logits, -1))


def test_seed_reproducible_and_distinct():
    a, b = draws(LOGITS, temperature=1.0, seed=7), draws(LOGITS, temperature=1.0, seed=7)
    np.testing.assert_array_equal(a, b)
    assert (a != draws(LOGITS, temperature=1.0, seed=8)).any()


def test_seeded_request_is_independent_of_its_batch(smollm2_llm):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = smollm2_llm.generate("Write a haiku about rain.", params)[0]
    again = smollm2_llm.generate(["Write a haiku about rain.", "Hello"], [params, SamplingParams(seed=1)])[0]
    assert alone.token_ids == again.token_ids
    other = smollm2_llm.generate("Write a haiku about rain.", SamplingParams(max_tokens=16, temperature=0.9, seed=99))
    assert other[0].token_ids != alone.token_ids


def test_stop_strings_ignore_eos_and_max_tokens(smollm2_llm):
    out = smollm2_llm.generate("1, 2, 3, 4, 5,", SamplingParams(max_tokens=40, temperature=0, stop=[" 9"]))[0]
    assert out.finish_reason == "stop" and " 9" not in out.text and out.text.strip().endswith("8,")
    out = smollm2_llm.generate("Hi", SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_repeated_calls_do_not_recompile(smollm2_llm):
    params = SamplingParams(max_tokens=5, temperature=0.5, seed=3)
    smollm2_llm.generate(["a b c", "d e"], params)
    before = smollm2_llm.engine.compile_count
    for prompt in (["x y z w", "q"], ["hello there", "one two three"]):
        smollm2_llm.generate(prompt, params)
    assert smollm2_llm.engine.compile_count == before


@pytest.mark.parametrize("prompt,match", [
    ("", "prompt is empty"), ([], "prompts is empty"), ([5, 10**6], r"token ids must be integers in \[0, 49152\)"),
    ([3, -1], "token ids"),
])
def test_bad_prompts(smollm2_llm, prompt, match):
    with pytest.raises(InvalidRequestError, match=match):
        smollm2_llm.generate(prompt)


def test_prompt_longer_than_context(smollm2_llm):
    with pytest.raises(InvalidRequestError, match="more than the model context of 8192"):
        smollm2_llm.generate([[7] * 8192])
    with pytest.raises(InvalidRequestError, match=r"max_tokens \(200\)"):
        smollm2_llm.generate([[7] * 8000], SamplingParams(max_tokens=200))
