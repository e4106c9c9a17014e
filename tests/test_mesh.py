"""Tensor-parallel meshes (jaxserve.parallel): `--mesh` parsing, replica meshes, the logical-axis
table on SmolLM2-135M (9 query heads, 3 kv heads, FFN 1536, vocab 49152), and engines on tp=2, tp=3
and both dp=2 x tp=2 replicas giving the single-device engine's greedy tokens without recompiling.

tp=2 splits neither kind of head (9 and 3 are odd) but splits the FFN and the vocabulary; tp=3 splits
everything, so each device holds one kv head of every KV page.
"""
import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from engine_runs import SMALL_ENGINE
from tiny_models import make_hf_model, save_safetensors

from jaxserve import LLM, SamplingParams
from jaxserve.checkpoint import load_model
from jaxserve.config import ModelConfig
from jaxserve.engine import Engine, EngineConfig, kv_bytes_per_page, load_engines
from jaxserve.parallel import (
    MeshSpec,
    describe_placement,
    device_mesh,
    param_shardings,
    parse_mesh,
    partition_spec,
    replica_meshes,
    replica_view,
    shard_params,
    single_engine_mesh,
)

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)
SMALL = EngineConfig(**SMALL_ENGINE)  # also the lifecycle tests' servers (conftest)
REPLICATED = P(None, None, None)


def mesh_of(tp: int, first_device: int = 0) -> Mesh:
    return replica_meshes(MeshSpec(tp=tp), jax.devices()[first_device:])[0]


# ---- --mesh text and replica meshes -------------------------------------------------------------

@pytest.mark.parametrize("text, spec", [
    ("tp=2", MeshSpec(tp=2)), ("tp=2,dp=2", MeshSpec(tp=2, dp=2)), ("dp=2,tp=4", MeshSpec(tp=4, dp=2)),
    (" tp = 3 ", MeshSpec(tp=3)), ("dp=3", MeshSpec(dp=3)), ("", MeshSpec()), (None, MeshSpec())])
def test_parse_mesh(text, spec):
    assert parse_mesh(text) == spec


@pytest.mark.parametrize("text, message", [
    ("pp=2", "--mesh: unknown axis 'pp' (known: tp, ep, dp)"),
    ("tp=0", "--mesh: tp must be a positive integer, got 0"),
    ("dp=-2", "--mesh: dp must be a positive integer, got -2"),
    ("tp=two", "--mesh: tp must be a positive integer, got 'two'"),
    ("tp=2,tp=4", "--mesh: axis 'tp' given twice"),
    ("tp", "--mesh: expected axis=size, got 'tp'"),
    ("tp=2,", "--mesh: expected axis=size, got ''"),
    ("tp=", "--mesh: expected axis=size, got 'tp='")])
def test_parse_mesh_rejects(text, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        parse_mesh(text)
    assert "\n" not in str(e.value)


def test_replica_meshes_take_disjoint_consecutive_devices():
    meshes = replica_meshes(MeshSpec(tp=2, dp=3))
    assert [[d.id for d in m.devices.flat] for m in meshes] == [[0, 1], [2, 3], [4, 5]]
    assert all(m.axis_names == ("tp",) for m in meshes)
    assert [d.id for d in mesh_of(2, first_device=4).devices.flat] == [4, 5]


def test_replica_meshes_need_enough_devices():
    with pytest.raises(ValueError, match=re.escape("needs 12 devices (tp x ep x dp), but only 8 are available")):
        replica_meshes(MeshSpec(tp=4, dp=3))


def test_single_engine_mesh():
    assert [d.id for d in single_engine_mesh("tp=2").devices.flat] == [0, 1]
    assert single_engine_mesh("tp=1") is None and single_engine_mesh(None) is None
    mesh = mesh_of(4)
    assert single_engine_mesh(mesh) is mesh
    with pytest.raises(ValueError, match="dp > 1"):
        single_engine_mesh(MeshSpec(tp=2, dp=2))


def test_llm_refuses_replicas_before_loading():
    with pytest.raises(ValueError, match="dp > 1"):
        LLM("/no/such/checkpoint", mesh="tp=2,dp=2")


# ---- the logical-axis table -----------------------------------------------------------------------

def config(num_heads: int, num_kv_heads: int, intermediate: int = 96, vocab: int = 301) -> ModelConfig:
    return ModelConfig("llama", vocab, 64, intermediate, 2, num_heads, num_kv_heads, 16, 256)


@pytest.mark.parametrize("heads, kv_heads, tp, q_split, kv_split", [
    (4, 2, 2, True, True), (8, 2, 4, True, False), (9, 3, 2, False, False), (9, 3, 3, True, True)])
def test_heads_split_only_when_they_divide(heads, kv_heads, tp, q_split, kv_split):
    cfg, mesh = config(heads, kv_heads), mesh_of(tp)
    assert partition_spec(("layers", "embed", "q_heads"), cfg, mesh) == P(None, None, "tp" if q_split else None)
    assert partition_spec(("layers", "embed", "kv_heads"), cfg, mesh) == P(None, None, "tp" if kv_split else None)


def test_placement_line_names_what_is_split_and_why_not():
    line = describe_placement(config(8, 2, intermediate=96, vocab=301), mesh_of(4))
    assert "split q_heads 8/4, ffw 96/4" in line
    assert "kv_heads (2 not divisible by tp=4)" in line and "vocab (301 not divisible by tp=4)" in line


# ---- SmolLM2 on meshes ------------------------------------------------------------------------------

EXPECTED_SPECS = {  # tp -> {param: spec}
    2: {"wq": REPLICATED, "wk": REPLICATED, "wo": REPLICATED, "w_gate": P(None, None, "tp"),
        "w_down": P(None, "tp", None), "attn_norm": P(None, None)},
    3: {"wq": P(None, None, "tp"), "wk": P(None, None, "tp"), "wv": P(None, None, "tp"),
        "wo": P(None, "tp", None), "w_up": P(None, None, "tp"), "w_down": P(None, "tp", None)},
}


@pytest.fixture(scope="module")
def model(smollm2_model):
    return smollm2_model


@pytest.fixture(scope="module")
def model_tp3(smollm2_gguf):
    """Loaded straight into its tp=3 shardings."""
    mesh = mesh_of(3)
    return load_model(smollm2_gguf, progress=False, shardings=lambda cfg: param_shardings(cfg, mesh))


def generate(engine: Engine, prompts) -> tuple[list[list[int]], list[list[float]]]:
    """All prompts at once; greedy token ids and their logprobs. Asserts nothing recompiles."""
    compiled = engine.compile_count
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    tokens, logprobs = {i: [] for i in ids}, {i: [] for i in ids}
    while engine.has_unfinished():
        for d in engine.step():
            tokens[d.request_id] += d.new_token_ids
            logprobs[d.request_id] += [s.logprob for s in d.logprobs or ()]
    assert engine.compile_count == compiled, "a step recompiled"
    return [tokens[i] for i in ids], [logprobs[i] for i in ids]


@pytest.fixture(scope="module")
def prompts(model):
    short = ["What is the capital of France?", "def fibonacci(n):", "1, 2, 3, 5, 8,"]
    long = ["Explain the theory of relativity in detail. " * 12,
            " ".join(f"item {i}:" for i in range(20)),
            "The quick brown fox jumps over the lazy dog while the cat watches from the fence. " * 6]
    lengths = [len(model.tokenizer.encode(p)) for p in long]
    assert all(90 <= n <= 130 for n in lengths), lengths
    return short + long


@pytest.fixture(scope="module")
def reference(model, prompts):
    return generate(Engine(model, SMALL), prompts)


def assert_matches(got, reference):
    (tokens, logprobs), (ref_tokens, ref_logprobs) = got, reference
    assert tokens == ref_tokens
    assert all(len(t) == GREEDY.max_tokens for t in tokens)
    # Split matmuls sum in another order: logits differ by ~1e-4 at most (see the README).
    assert np.abs(np.array(logprobs) - np.array(ref_logprobs)).max() < 1e-3


def assert_specs(model, tp: int):
    layers = model.params["layers"]
    for name, spec in EXPECTED_SPECS[tp].items():
        assert layers[name][...].sharding.spec == spec, name
    assert model.params["embed"][...].sharding.spec == P("tp", None)  # 49152 divides by 2 and 3


@pytest.mark.slow
def test_tp2_replicates_heads_and_splits_the_ffn(model, prompts, reference):
    mesh = mesh_of(2)
    engine = Engine(model, SMALL, mesh)
    assert_specs(engine.model, 2)
    kv = engine.runner.state.kv
    assert kv.k.sharding.spec == P(None, None, None, None, None)
    assert kv.k.addressable_shards[0].data.shape == kv.k.shape  # every device holds every head
    assert_matches(generate(engine, prompts), reference)


@pytest.mark.slow
def test_tp3_splits_heads_and_kv_pages(model, model_tp3, prompts, reference):
    mesh = mesh_of(3)
    assert shard_params(model_tp3, mesh) is model_tp3  # loaded in place: nothing to move
    engine = Engine(model_tp3, SMALL, mesh)
    assert engine.model is model_tp3
    assert_specs(model_tp3, 3)
    assert model_tp3.params["layers"]["wk"][...].addressable_shards[0].data.shape == (30, 576, 64)  # one kv head
    kv = engine.runner.state.kv
    assert kv.k.sharding.spec == P(None, None, None, "tp", None)
    assert kv.k.addressable_shards[0].data.shape[3] == 1 and kv.k.shape[3] == 3
    # kv_cache_memory is per device and each device holds a third of every page.
    fmt = engine.kv_format
    assert kv_bytes_per_page(model, 16, fmt, mesh) * 3 == kv_bytes_per_page(model, 16, fmt)
    assert_matches(generate(engine, prompts), reference)


@pytest.mark.slow
def test_tp3_bfloat16_weights_held_as_bits_match_one_device(smollm2_gguf, prompts):
    """bfloat16 layer stacks travel as uint16 bits on CPU (layers.as_stored), sharded like any weight."""
    mesh = mesh_of(3)
    sharded = load_model(smollm2_gguf, dtype="bfloat16", progress=False,
                         shardings=lambda cfg: param_shardings(cfg, mesh))
    assert sharded.params["layers"]["wq"][...].dtype == jax.numpy.uint16
    assert_specs(sharded, 3)
    single = load_model(smollm2_gguf, dtype="bfloat16", progress=False)
    (tokens, logprobs), (ref_tokens, ref_logprobs) = (generate(Engine(m, SMALL, mesh if m is sharded else None),
                                                               prompts[:2]) for m in (sharded, single))
    assert tokens == ref_tokens
    # Activations are rounded to bfloat16 before each dot, so split sums that differ in float32's last
    # bits can round one way or the other: logprobs differ by up to ~0.04 (measured), and near-ties can
    # flip a greedy token (the counting prompt does at token 14), so only the first two prompts are compared.
    assert np.abs(np.array(logprobs) - np.array(ref_logprobs)).max() < 0.1


@pytest.mark.slow
def test_data_parallel_replicas_each_match(model, prompts, reference):
    meshes = replica_meshes(parse_mesh("tp=2,dp=2"))
    for mesh in meshes:
        engine = Engine(model, SMALL, mesh)
        devices = set(mesh.devices.flat)
        assert engine.runner.state.kv.k.sharding.device_set == devices
        assert all(a.sharding.device_set == devices for a in jax.tree.leaves(engine.model.params))
        assert_matches(generate(engine, prompts), reference)


# ---- kernels and mixed splits on a tiny model ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """4 query heads over 2 kv heads: tp=2 splits both, tp=4 only the query heads."""
    return save_safetensors(make_hf_model("qwen2", seed=7), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(tiny_path, dtype="float32", progress=False)


def tiny_config(**options) -> EngineConfig:
    return EngineConfig(num_pages=32, max_num_seqs=4, max_num_batched_tokens=16, **options)


def tiny_generate(engine):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, engine.info().model_config.vocab_size, n).tolist() for n in (3, 17, 40)]
    return generate(engine, prompts)


def tiny_tokens(model, mesh, **options):
    return tiny_generate(Engine(model, tiny_config(**options), mesh))


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    """kv_cache_dtype -> (tokens, logprobs) of the single-device XLA engine, memoized."""
    memo = {}

    def run(kv_cache_dtype: str):
        if kv_cache_dtype not in memo:
            memo[kv_cache_dtype] = tiny_tokens(tiny, None, kv_cache_dtype=kv_cache_dtype)
        return memo[kv_cache_dtype]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("tp, options", [
    (1, {}),  # the server's default: a one-device mesh
    (4, {}),  # query heads split, kv heads replicated: every device attends with all heads
    (2, {"kv_cache_dtype": "int8", "attention_backend": "pallas"}),  # the GPU kernel (interpreted) per device
])
def test_tiny_model_on_a_mesh(tiny, tiny_reference, tp, options):
    ref_tokens, ref_logprobs = tiny_reference(options.get("kv_cache_dtype", "auto"))
    tokens, logprobs = tiny_tokens(tiny, mesh_of(tp), **options)
    assert tokens == ref_tokens
    # int8 pages: channel scales calibrated on a split model differ in the last bits, moving a few codes
    assert np.abs(np.array(logprobs) - np.array(ref_logprobs)).max() < (2e-3 if options else 1e-4)


@pytest.mark.slow
def test_replicas_view_one_load_without_copies(tiny_path, tiny_reference):
    """`tp=2,dp=2` loads the checkpoint once onto the (dp, tp) device mesh; each replica's weights are
    the buffers already on its devices, and each replica gives the single device's tokens."""
    spec = parse_mesh("tp=2,dp=2")
    devices = device_mesh(spec)
    loaded = load_model(tiny_path, dtype="float32", progress=False, mesh=devices)
    for row in replica_meshes(devices):
        view = replica_view(loaded, devices, row)
        on_row = set(row.devices.flat)
        for whole, part in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(view.params)):
            want = {s.device: s.data.unsafe_buffer_pointer() for s in whole.addressable_shards if s.device in on_row}
            assert {s.device: s.data.unsafe_buffer_pointer() for s in part.addressable_shards} == want
    engines = load_engines(tiny_path, tiny_config(), spec, dtype="float32", progress=False)
    assert [e.info().devices for e in engines] == [(0, 1), (2, 3)]
    tokens, logprobs = tiny_reference("auto")
    for engine in engines:
        got_tokens, got_logprobs = tiny_generate(engine)
        assert got_tokens == tokens
        assert np.abs(np.array(got_logprobs) - np.array(logprobs)).max() < 1e-4
