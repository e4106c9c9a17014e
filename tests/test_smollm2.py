"""The real model: SmolLM2-135M-Instruct from its GGUF, against HF transformers loading the same file."""
import json
import pathlib

import numpy as np
import pytest
import torch

from jaxserve import SamplingParams
from jaxserve.checkpoint import convert, load_model
from tiny_models import our_logits, save_safetensors

# varied prompts (prose, code, numbers, chat-style), shared with benchmarks/kv_cache_quality.py
PROMPTS = json.loads((pathlib.Path(__file__).parents[1] / "benchmarks" / "data" / "prompts.json").read_text())
CHAT = [{"role": "user", "content": "Give me three tips for better sleep."}]


def hf_greedy(model, ids, n):
    """Plain greedy decoding with HF's KV cache and no stopping: the reference continuation."""
    out, past, inp = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            inp = torch.tensor([[out[-1]]])
    return out


def test_greedy_continuations_match_transformers(smollm2_llm, hf_smollm2):
    tok = smollm2_llm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS] + [tok.encode_chat(CHAT)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    outputs = smollm2_llm.generate(prompts, params)  # all nine in one padded batch
    for ids, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(hf_smollm2, ids, 32), tok.decode(ids)
        assert len(out.token_ids) == 32


def test_batched_generation_equals_each_prompt_alone(smollm2_llm):
    params = SamplingParams(max_tokens=12, temperature=0)
    together = smollm2_llm.generate(PROMPTS[:4], params)
    for prompt, out in zip(PROMPTS[:4], together):
        assert smollm2_llm.generate(prompt, params)[0].token_ids == out.token_ids


def test_chat_answers_paris(smollm2_llm):
    out = smollm2_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_tokens=32, temperature=0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
    assert out.token_ids[-1] in smollm2_llm.tokenizer.eos_token_ids


def test_safetensors_gguf_and_orbax_give_identical_logits(smollm2_gguf, hf_smollm2, smollm2_llm, tmp_path):
    st_dir = save_safetensors(hf_smollm2, tmp_path / "st", tokenizer=smollm2_llm.tokenizer)
    convert(smollm2_gguf, tmp_path / "from_gguf", progress=False)
    convert(st_dir, tmp_path / "from_st", progress=False)
    ids = smollm2_llm.tokenizer.encode_chat(CHAT)
    reference = our_logits(smollm2_llm.engine.model, ids)
    for path in (st_dir, tmp_path / "from_gguf", tmp_path / "from_st"):
        loaded = load_model(path, dtype="float32", progress=False)
        assert loaded.config == smollm2_llm.config
        np.testing.assert_array_equal(our_logits(loaded, ids), reference, err_msg=str(path))
        assert loaded.tokenizer.encode_chat(CHAT) == ids


@pytest.mark.parametrize("split", [3, 20])
def test_incremental_decoding_matches_one_pass(smollm2_llm, hf_smollm2, split):
    ids = smollm2_llm.tokenizer.encode(PROMPTS[2])
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
    got = our_logits(smollm2_llm.engine.model, ids, split=min(split, len(ids) - 1))
    assert np.abs(got - ref).max() < 1e-3  # float32 over 30 layers; logits reach ~40
