"""Numerical parity with HF transformers (float32) for every supported architecture."""
import numpy as np
import pytest

from jaxserve.checkpoint import load_model
from tiny_models import VARIANTS, hf_logits, make_hf_model, our_logits, save_safetensors

PROMPT_LENGTHS = (1, 7, 33)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    hf = make_hf_model(variant, seed=len(variant))
    # Sharded for one variant so the index.json path is exercised too.
    save_safetensors(hf, tmp_path, max_shard_size=7 if variant == "llama" else None)
    ours = load_model(tmp_path, dtype="float32", progress=False)
    rng = np.random.default_rng(0)
    for n in PROMPT_LENGTHS:
        ids = rng.integers(0, hf.config.vocab_size, n).tolist()
        ref = hf_logits(hf, ids)
        got = our_logits(ours, ids)
        assert np.abs(got - ref).max() < 1e-4, (variant, n, np.abs(got - ref).max())
        assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen3"])
def test_incremental_decode_matches_full_prefill(variant, tmp_path):
    """Prefill 5 tokens then decode one at a time through the cache: same logits as HF's full pass.
    (Mistral's sliding window of 5 makes the early keys fall out of view along the way.)"""
    hf = make_hf_model(variant, seed=3)
    ours = load_model(save_safetensors(hf, tmp_path), dtype="float32", progress=False)
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, 20).tolist()
    assert np.abs(our_logits(ours, ids, split=5) - hf_logits(hf, ids)).max() < 1e-4


def test_bfloat16_stays_close(tmp_path):
    hf = make_hf_model("llama", seed=5)
    ours = load_model(save_safetensors(hf, tmp_path), dtype="bfloat16", progress=False)
    ids = list(range(1, 30))
    ref, got = hf_logits(hf, ids), our_logits(ours, ids)
    # bfloat16 keeps ~3 significant digits; errors compound over layers.
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
