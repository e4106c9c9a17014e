"""Mixture-of-experts models (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE with a dense layer
mixed in): parity with HF transformers through the paged forward and the engine, the three
checkpoint formats, batch invariance of the dropless dispatch, the grouped-matmul implementations
against each other, dynamic expert skipping, and bad checkpoints."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve import SamplingParams
from jaxserve.checkpoint import convert, load_model
from jaxserve.config import ModelConfig, from_hf_config
from jaxserve.engine import Engine, EngineConfig
from jaxserve.errors import CheckpointError
from jaxserve.ops.moe import routed_experts, route
from tiny_models import MOE_VARIANTS, hf_logits, make_hf_model, our_logits, save_safetensors, write_gguf

PROMPT_LENGTHS = (1, 7, 33, 70)
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
ENGINE = EngineConfig(num_pages=96, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=160)
LOGIT_TOLERANCE = 1e-4   # float32; summation order differs from PyTorch (measured max ~1e-5)


def prompts_for(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module", params=MOE_VARIANTS)
def variant(request, tmp_path_factory):
    """(name, HF model, safetensors dir, GGUF path, loaded from safetensors, engine on it)."""
    name = request.param
    hf = make_hf_model(name, seed=3)
    root = tmp_path_factory.mktemp(name)
    st = save_safetensors(hf, root / "st")
    gguf = write_gguf(hf, root / "model.gguf")
    loaded = load_model(st, dtype="float32", progress=False)
    return name, hf, st, gguf, loaded, Engine(loaded, ENGINE)


def run(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    for d in engine.run_to_completion():
        tokens[d.request_id] += d.new_token_ids
    return [tokens[i] for i in ids]


# ---- config -----------------------------------------------------------------------------------------

def test_configs_read_experts_and_which_layers_are_dense(variant):
    name, hf, _, _, loaded, _ = variant
    cfg = loaded.config
    assert cfg.architecture == name and cfg.num_experts == (6 if name == "qwen3_moe" else 4)
    assert cfg.num_experts_per_token == 2
    kinds = [g.kind for g in cfg.layer_groups for _ in g.layers]
    assert kinds == (["moe", "dense", "moe"] if name == "qwen3_moe" else ["moe"] * 3)
    assert cfg.shared_expert_intermediate_size == (80 if name == "qwen2_moe" else 0)
    assert cfg.norm_topk_prob == (name != "qwen2_moe")


def test_decoder_sparse_step_and_mlp_only_layers_pick_dense_layers():
    hf = dict(model_type="qwen2_moe", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=6,
              num_attention_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
              decoder_sparse_step=2, mlp_only_layers=[3])
    cfg = from_hf_config(hf)
    assert cfg.dense_layers == (0, 2, 3, 4)
    assert [(g.kind, g.start, g.count) for g in cfg.layer_groups] == [
        ("dense", 0, 1), ("moe", 1, 1), ("dense", 2, 3), ("moe", 5, 1)]
    assert [g.name for g in cfg.layer_groups] == ["layers", "layers_1", "layers_2", "layers_5"]
    assert ModelConfig.from_json(cfg.to_json()) == cfg


# ---- parity with HF transformers ----------------------------------------------------------------------

def test_logits_match_transformers_through_the_paged_forward(variant):
    """Every logit; the engine test below covers more prompt lengths (each length here compiles)."""
    _, hf, _, _, loaded, _ = variant
    ids = prompts_for(loaded.config.vocab_size, (33,))[0]
    ref = hf_logits(hf, ids)
    assert np.abs(our_logits(loaded, ids) - ref).max() < LOGIT_TOLERANCE
    # a prefill, then one token at a time through the KV pages
    assert np.abs(our_logits(loaded, ids, split=16) - ref).max() < LOGIT_TOLERANCE


def test_engine_prompt_logprobs_match_transformers(variant):
    _, hf, _, _, loaded, engine = variant
    prompts = prompts_for(loaded.config.vocab_size, PROMPT_LENGTHS[1:] + (130,), seed=1)
    ids = [engine.add_request(p, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)) for p in prompts]
    got = {}
    for d in engine.run_to_completion():
        if d.prompt_logprobs is not None:
            got[d.request_id] = np.array(d.prompt_logprobs[1:])
    for rid, p in zip(ids, prompts):
        ref = torch.log_softmax(torch.tensor(hf_logits(hf, p)), -1).numpy()
        want = ref[np.arange(len(p) - 1), p[1:]]
        assert np.abs(got[rid] - want).max() < LOGIT_TOLERANCE


def test_greedy_continuations_match_transformers(variant):
    _, hf, _, _, loaded, engine = variant
    prompts = prompts_for(loaded.config.vocab_size, (3, 11, 26, 50), seed=2)
    ours = run(engine, prompts, GREEDY)
    for p, got in zip(prompts, ours):
        ids = list(p)
        for _ in range(32):   # greedy by hand: HF's generate would stop at (or suppress) the EOS id
            ids.append(int(hf_logits(hf, ids)[-1].argmax()))
        assert got == ids[len(p):]


def test_safetensors_gguf_and_orbax_give_identical_logits(variant, tmp_path):
    _, _, st, gguf, loaded, _ = variant
    ids = prompts_for(loaded.config.vocab_size, (21,))[0]
    want = our_logits(loaded, ids)
    from_gguf = load_model(gguf, dtype="float32", progress=False)
    # GGUF holds the norm epsilon as float32 (the same number once the model computes in float32)
    assert dataclasses.replace(from_gguf.config, rms_norm_eps=loaded.config.rms_norm_eps) == loaded.config
    np.testing.assert_array_equal(our_logits(from_gguf, ids), want)
    for src in (st, gguf):
        orbax = load_model(convert(src, tmp_path / src.name, progress=False), dtype="float32", progress=False)
        np.testing.assert_array_equal(our_logits(orbax, ids), want)


# ---- dropless dispatch ------------------------------------------------------------------------------

def test_sixteen_staggered_requests_get_the_tokens_each_gets_alone(variant):
    _, _, _, _, loaded, engine = variant
    prompts = prompts_for(loaded.config.vocab_size, [3 + 9 * i % 61 for i in range(16)], seed=5)
    alone = [run(engine, [p], GREEDY)[0] for p in prompts]
    ids, tokens, waiting = [], {}, list(enumerate(prompts))
    while waiting or engine.has_unfinished():
        for _ in range(min(2, len(waiting))):  # two new requests arrive every step
            i, p = waiting.pop(0)
            ids.append(engine.add_request(p, GREEDY))
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
    assert [tokens[i] for i in ids] == alone


def _random_layer(seed: int, tokens: int, experts: int, d: int = 16, f: int = 24):
    keys = jax.random.split(jax.random.key(seed), 5)
    p = {"router": jax.random.normal(keys[0], (d, experts)),
         "we_gate": jax.random.normal(keys[1], (experts, d, f)) * 0.3,
         "we_up": jax.random.normal(keys[2], (experts, d, f)) * 0.3,
         "we_down": jax.random.normal(keys[3], (experts, f, d)) * 0.3}
    return p, jax.random.normal(keys[4], (tokens, d))


def _moe_config(experts: int, k: int, **router) -> ModelConfig:
    return ModelConfig("mixtral", 32, 16, 24, 1, 2, 2, 8, 64, num_experts=experts, num_experts_per_token=k,
                       moe_intermediate_size=24, **router)


def _per_token_reference(p, x, cfg):
    """Each token through its chosen experts one at a time, in numpy float64."""
    weights, experts = (np.asarray(a) for a in route(x, p["router"], cfg))
    x, w = np.asarray(x, np.float64), {k: np.asarray(v.astype(jnp.float32), np.float64) for k, v in p.items()}
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for wt, e in zip(weights[t], experts[t]):
            if e < cfg.num_experts:
                g, u = x[t] @ w["we_gate"][e], x[t] @ w["we_up"][e]
                out[t] += wt * ((g / (1 + np.exp(-g))) * u) @ w["we_down"][e]
    return out


# bfloat16: the hidden activation is rounded to bfloat16 (8 significant bits) before the down
# projection, which the float64 reference does not do; outputs are O(1)
BF16_TOLERANCE = 5e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["rounds", "ragged_dot", "tpu-interpret", "gpu-interpret"])
def test_grouped_implementations_match_a_per_token_reference(impl, dtype):
    """Uneven groups (a skewed router), experts left empty, more rows than a round."""
    cfg = _moe_config(8, 3)
    p, x = _random_layer(0, 150, 8)
    p["router"] = p["router"].at[:, :2].add(3.0)   # most tokens go to experts 0 and 1
    p = {k: v if k == "router" else v.astype(dtype) for k, v in p.items()}
    got = np.asarray(jax.jit(lambda p, x: routed_experts(p, x, cfg, impl))(p, x))
    want = _per_token_reference(p, x.astype(dtype).astype(jnp.float32), cfg)
    tol = 1e-4 if dtype == "float32" else BF16_TOLERANCE
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_a_tokens_result_does_not_depend_on_the_rest_of_the_batch():
    """Dropless: each token alone (its copies filling the batch, so its two experts get every row)
    gets what it gets among 63 others. Equal up to float32 rounding: the matmul's row count
    changes with the batch (the engine test above checks the greedy tokens)."""
    cfg = _moe_config(4, 2)
    p, x = _random_layer(1, 64, 4)
    whole = jax.jit(lambda x: routed_experts(p, x, cfg, "rounds"))
    batched = np.asarray(whole(x))
    alone = np.concatenate([np.asarray(whole(jnp.tile(x[i:i + 1], (64, 1))))[:1] for i in range(0, 64, 9)])
    np.testing.assert_allclose(batched[::9], alone, rtol=1e-5, atol=1e-6)


# ---- dynamic expert skipping --------------------------------------------------------------------

def test_skipping_drops_light_experts_and_keeps_each_tokens_total_weight():
    plain = _moe_config(8, 3)
    p, x = _random_layer(2, 40, 8)
    w0, e0 = (np.asarray(a) for a in route(x, p["router"], plain))
    for router in (dict(moe_min_router_weight=0.3), dict(moe_top_p=0.5)):
        cfg = _moe_config(8, 3, **router)
        w, e = (np.asarray(a) for a in route(x, p["router"], cfg))
        kept = e < 8
        assert kept[:, 0].all() and 0 < (~kept).sum() < kept.size   # some, not all, skipped
        np.testing.assert_allclose(w.sum(1), w0.sum(1), rtol=1e-6)
        np.testing.assert_array_equal(e[kept], e0[kept])
        share = w0 / w0.sum(1, keepdims=True)
        if "moe_min_router_weight" in router:   # dropped: below the threshold; kept: the top one or above it
            assert (share[~kept] < 0.3).all()
            assert ((share >= 0.3) | (np.arange(3) == 0))[kept].all()
        got = np.asarray(routed_experts(p, x, cfg, "rounds"))
        np.testing.assert_allclose(got, _per_token_reference(p, x, cfg), rtol=1e-4, atol=1e-4)


def test_skipping_that_skips_nothing_is_bit_identical_to_the_plain_router():
    p, x = _random_layer(3, 33, 4)
    plain = np.asarray(routed_experts(p, x, _moe_config(4, 2), "rounds"))
    never = np.asarray(routed_experts(p, x, _moe_config(4, 2, moe_min_router_weight=1e-9), "rounds"))
    np.testing.assert_array_equal(plain, never)


def test_engine_skipping_that_skips_nothing_gives_the_same_tokens(variant):
    """The skipping router compiled in, with a threshold no expert falls below."""
    _, _, _, _, loaded, engine = variant
    prompts = prompts_for(loaded.config.vocab_size, (12, 30), seed=6)
    off = run(engine, prompts, GREEDY)
    assert run(Engine(loaded, dataclasses.replace(ENGINE, moe_min_router_weight=1e-9)), prompts, GREEDY) == off


def test_engine_with_expert_skipping_runs_the_skipping_router(mixtral_dir):
    loaded = load_model(mixtral_dir, dtype="float32", progress=False)
    small = EngineConfig(num_pages=16, max_num_seqs=2, max_num_batched_tokens=16, moe_min_router_weight=0.45)
    skipping = Engine(loaded, small)
    assert skipping.info().model_config.moe_min_router_weight == 0.45
    assert [len(t) for t in run(skipping, prompts_for(loaded.config.vocab_size, (5, 20)), GREEDY)] == [32, 32]
    with pytest.raises(ValueError, match="moe_top_p"):
        EngineConfig(moe_top_p=0.0)


def test_router_options_are_refused_for_a_dense_model(tmp_path):
    dense = load_model(save_safetensors(make_hf_model("llama"), tmp_path / "llama"), dtype="float32", progress=False)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        Engine(dense, EngineConfig(num_pages=8, moe_top_p=0.5))


# ---- bad checkpoints ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_safetensors(make_hf_model("mixtral", seed=4), tmp_path_factory.mktemp("mixtral"))


def _rewrite(src, dst, edit):
    """A copy of the safetensors dir `src` at `dst` with its tensors passed through edit(dict)."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    save_file(edit(tensors), dst / "model.safetensors")
    return dst


def test_a_missing_expert_tensor_is_named(mixtral_dir, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    bad = _rewrite(mixtral_dir, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=f"missing {name}$"):
        load_model(bad, dtype="float32", progress=False)


def test_a_mismatched_expert_shape_is_named(mixtral_dir, tmp_path):
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    bad = _rewrite(mixtral_dir, tmp_path / "bad", lambda t: {**t, name: t[name][:, :-1].copy()})
    with pytest.raises(CheckpointError, match=r"we_down\[0\]\[expert 1\] has shape \(95, 64\), expected \(96, 64\)"):
        load_model(bad, dtype="float32", progress=False)


def test_more_experts_per_token_than_experts_names_the_field(mixtral_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((mixtral_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 5}))
    (bad / "model.safetensors").symlink_to(mixtral_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="num_experts_per_tok=5 must be between 1 and num_experts=4"):
        load_model(bad, dtype="float32", progress=False)


# ---- the rest of the stack, unchanged -------------------------------------------------------------

def test_prefix_cache_and_int8_pages_serve_moe_models(variant):
    name, _, _, _, loaded, engine = variant
    shared = prompts_for(loaded.config.vocab_size, (48,), seed=7)[0]
    prompts = [shared + [1, 2], shared + [3]]
    first = run(engine, prompts[:1], GREEDY)
    hits = engine.stats().prefix_cache_hits
    assert run(engine, prompts, GREEDY)[0] == first[0] and engine.stats().prefix_cache_hits > hits
    if name == "qwen2_moe":   # one format is enough: pages are the same whatever the FFN
        int8 = Engine(loaded, dataclasses.replace(ENGINE, kv_cache_dtype="int8"))
        assert int8.info().kv_cache_dtype == "int8"
        assert [len(t) for t in run(int8, prompts, GREEDY)] == [32, 32]


@pytest.fixture(scope="module")
def moe_with_tokenizer(tmp_path_factory, smollm2_gguf):
    """A tiny Qwen2-MoE with SmolLM2's vocabulary and tokenizer, for the CLI."""
    from jaxserve.checkpoint.gguf_io import open_gguf
    from jaxserve.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(open_gguf(smollm2_gguf))
    model = make_hf_model("qwen2_moe", vocab_size=49152, hidden_size=32, max_position_embeddings=128)
    return save_safetensors(model, tmp_path_factory.mktemp("moe_tok"), tokenizer=tok)


def test_cli_converts_generates_and_scores_with_an_moe_model(moe_with_tokenizer, tmp_path):
    from test_cli import run as jaxserve

    small = ["--max-num-batched-tokens", "32", "--kv-cache-memory", "16M"]
    res = jaxserve("convert", str(moe_with_tokenizer), str(tmp_path / "orbax"))
    assert res.returncode == 0, res.stderr
    res = jaxserve("generate", "--model", str(tmp_path / "orbax"), "--prompt", "The sky is", "--max-tokens", "6",
                   "--temperature", "0", "--ignore-eos", "--json", "--kv-cache-dtype", "int8", "--moe-top-p", "0.7",
                   *small)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["token_ids"]) == 6
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    res = jaxserve("perplexity", "--model", str(moe_with_tokenizer), "--file", str(tmp_path / "text.txt"),
                   "--ctx", "32", "--json", *small)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["tokens"] > 64 and 1.0 < result["perplexity"] < 1e6
