"""Quantized KV caches end to end on the real SmolLM2-135M: page accounting by real bytes,
perplexity through the paged cache against the unquantized cache, and the `jaxserve perplexity`
command."""
import json
import pathlib
import subprocess
import sys

import pytest

from engine_runs import SERVER_ENGINE
from jaxserve import LLM
from jaxserve.perplexity import perplexity
from pallas_kernels.kv_quant import FORMATS, bytes_per_page

pytestmark = pytest.mark.slow
ALICE = pathlib.Path(__file__).parents[1] / "benchmarks" / "data" / "alice_ch1-3.txt"
MEMORY = 64 << 20
CTX = 256  # windows of 256 tokens, prefilled 64 at a time: later chunks read quantized pages
# Perplexity increase over `auto` on these 1,020 tokens: a regression check near the targets
# (8-bit +1%, 4-bit +5%), which benchmarks/kv_cache_quality.py measures on 8,457 tokens at ctx 2048.
# Measured here on an AVX512 host: fp8 -0.15%, int8 +0.04%, int4 +3.17%, nvfp4 +4.34%; on an AVX2-only
# host (same code, XLA:CPU rounds differently) nvfp4 gives +5.16% on these 4 short windows, hence 6%.
MAX_PPL_INCREASE = {"fp8": 0.01, "int8": 0.01, "int4": 0.04, "nvfp4": 0.06}
MIN_CAPACITY_VS_BF16 = {"fp8": 2.0, "int8": 2.0, "int4": 3.5, "nvfp4": 3.5}


@pytest.fixture(scope="module")
def alice_ids(smollm2_llm):
    return smollm2_llm.tokenizer.encode(ALICE.read_text())[:1025]


@pytest.fixture(scope="module")
def baseline_ppl(smollm2_llm, alice_ids):
    return perplexity(smollm2_llm.engine, alice_ids, CTX, progress=False)


@pytest.mark.parametrize("dtype", ["fp8", "int8", "int4", "nvfp4"])
def test_quantized_cache_capacity_and_perplexity(smollm2_llm, alice_ids, baseline_ppl, dtype):
    llm = LLM(smollm2_llm.engine.model, progress=False, kv_cache_dtype=dtype, kv_cache_memory=MEMORY,
              max_num_batched_tokens=64, max_num_seqs=8)
    engine, cfg = llm.engine, llm.config
    # Capacity: the pages really allocated fit the memory, and hold >= 2x / 3.5x bfloat16's tokens.
    assert sum(a.nbytes for a in engine.runner.state.kv.page_arrays) <= MEMORY
    bf16_tokens = MEMORY // bytes_per_page(FORMATS["bfloat16"], cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim) * 16
    assert engine.max_cached_tokens + 16 >= MIN_CAPACITY_VS_BF16[dtype] * bf16_tokens  # +16: the null page
    # Quality: perplexity over 4 windows of 256 tokens, later chunks attending to quantized pages.
    result = perplexity(engine, alice_ids, CTX, progress=False)
    assert result.tokens == baseline_ppl.tokens == len(alice_ids) - 5
    assert result.perplexity != baseline_ppl.perplexity  # the pages really are quantized
    assert result.perplexity <= baseline_ppl.perplexity * (1 + MAX_PPL_INCREASE[dtype])
    # Every page is free again afterwards.
    assert engine.block_manager.num_free_pages == engine.block_manager.num_usable_pages


def test_prompt_logprobs_match_between_chunked_and_whole_prefill(smollm2_llm, alice_ids):
    """The same window scored in one prefill and in 64-token chunks gives the same log-probs."""
    from jaxserve import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    whole = smollm2_llm.generate([alice_ids[:200]], params)[0].prompt_logprobs
    chunked = LLM(smollm2_llm.engine.model, progress=False, **SERVER_ENGINE)  # budget 64; compiled steps shared
    parts = chunked.generate([alice_ids[:200]], params)[0].prompt_logprobs
    assert whole[0] is None and parts[0] is None and len(whole) == 200
    assert max(abs(a - b) for a, b in zip(whole[1:], parts[1:])) < 1e-3
    assert sum(whole[1:]) / 199 < -1.0  # real text under a real model: finite, below zero


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxserve.cli", *args], capture_output=True, text=True, timeout=900)


def test_perplexity_command(smollm2_checkpoint, tmp_path):
    text = tmp_path / "alice.txt"
    text.write_text(ALICE.read_text()[:1500])
    run = _cli("perplexity", "--model", str(smollm2_checkpoint), "--file", str(text), "--kv-cache-dtype", "int8",
               "--ctx", "128", "--max-num-batched-tokens", "64", "--kv-cache-memory", "64M", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["kv_cache_dtype"] == "int8" and out["context"] == 128
    assert out["tokens"] > 250 and 1.0 < out["perplexity"] < 100.0


@pytest.mark.parametrize("args, message", [
    (["--file", "/nonexistent.txt"], "cannot read --file"),
    (["--file", __file__, "--kv-cache-dtype", "fp4"], "invalid choice"),
])
def test_perplexity_command_bad_input(args, message):
    run = _cli("perplexity", *args)
    assert run.returncode != 0
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1
