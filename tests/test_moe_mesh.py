"""Expert parallelism on 8 host devices: MoE engines on ep, tp x ep and a mesh whose ep does not divide
the expert count give the single device's greedy tokens; the placement is logged; a real server on
an ep mesh reports the model's experts."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxserve import SamplingParams
from jaxserve.checkpoint import load_model
from jaxserve.engine import Engine, EngineConfig
from jaxserve.llm import LLM
from jaxserve.parallel import parse_mesh, replica_meshes
from server_process import ServerProcess
from tiny_models import make_hf_model, save_safetensors

CONFIG = EngineConfig(num_pages=48, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    paths = {name: save_safetensors(make_hf_model(name, seed=11), root / name)
             for name in ("mixtral", "qwen2_moe", "qwen3_moe")}
    # experts that split over ep while their FFN width (50) does not split over tp=4
    paths["mixtral-ffw50"] = save_safetensors(make_hf_model("mixtral", seed=12, intermediate_size=50),
                                              root / "mixtral-ffw50")
    return paths


@pytest.fixture(scope="module")
def reference(paths):
    """name -> (tokens, logprobs) of the single-device engine, memoized."""
    memo = {}

    def get(name):
        if name not in memo:
            memo[name] = generate(Engine(load_model(paths[name], dtype="float32", progress=False), CONFIG))
        return memo[name]

    return get


def generate(engine):
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, engine.info().model_config.vocab_size, n).tolist() for n in (4, 19, 45)]
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    tokens, logprobs = {i: [] for i in ids}, {i: [] for i in ids}
    for d in engine.run_to_completion():
        tokens[d.request_id] += d.new_token_ids
        logprobs[d.request_id] += [s.logprob for s in d.logprobs or ()]
    return [tokens[i] for i in ids], np.array([logprobs[i] for i in ids])


def engine_mesh(text: str):
    return replica_meshes(parse_mesh(text))[0]


@pytest.mark.parametrize("name, mesh, placement", [
    ("mixtral", "tp=2", "kv_heads 2/2, moe_ffw 96/2"),   # experts whole, each split over tp
    ("mixtral", "ep=2", "experts 4/2"),
    ("mixtral", "ep=4", "experts 4/4"),
    ("mixtral", "tp=2,ep=2", "experts 4/2, moe_ffw 96/2"),
    ("qwen2_moe", "tp=2,ep=2", "experts 4/2, moe_ffw 48/2, shared_ffw 80/2"),
    ("qwen3_moe", "ep=4", "experts (6 not divisible by ep=4)"),   # replicated, not refused
    ("mixtral-ffw50", "tp=4,ep=2", "experts 4/2; replicated kv_heads (2 not divisible by tp=4), "
                                   "vocab (301 not divisible by tp=4), moe_ffw (50 not divisible by tp=4)"),
])
def test_expert_parallel_engines_give_the_single_device_tokens(paths, reference, caplog, name, mesh, placement):
    mesh = engine_mesh(mesh)
    loaded = load_model(paths[name], dtype="float32", progress=False, mesh=mesh)
    with caplog.at_level(logging.INFO, logger="jaxserve.parallel.placement"):
        engine = Engine(loaded, CONFIG, mesh)
    assert placement in caplog.text
    ep_split = "experts 4/" in placement
    assert loaded.params["layers"]["we_gate"][...].sharding.spec[1] == ("ep" if ep_split else None)
    tokens, logprobs = generate(engine)
    ref_tokens, ref_logprobs = reference(name)
    assert tokens == ref_tokens
    assert np.abs(logprobs - ref_logprobs).max() < 1e-4


def test_each_device_holds_only_its_experts(paths):
    mesh = engine_mesh("tp=2,ep=2")
    loaded = load_model(paths["mixtral"], dtype="float32", progress=False, mesh=mesh)
    we_up = loaded.params["layers"]["we_up"][...]    # [layers, experts 4, embed 64, moe_ffw 96]
    assert we_up.sharding.spec == P(None, "ep", None, "tp")
    assert {s.data.shape for s in we_up.addressable_shards} == {(3, 2, 64, 48)}
    assert loaded.params["layers"]["router"][...].sharding.spec == P(None, None, None)


def test_llm_takes_an_ep_mesh_as_text(paths, reference):
    llm = LLM(paths["mixtral"], dtype="float32", progress=False, mesh="ep=2", **CONFIG.__dict__)
    assert llm.info.mesh == (("ep", 2), ("tp", 1)) and len(llm.info.devices) == 2
    assert generate(llm.engine)[0] == reference("mixtral")[0]


@pytest.mark.slow
def test_server_on_an_ep_mesh_reports_the_experts(paths):
    server = ServerProcess(str(paths["qwen2_moe"]), "--mesh", "ep=2,dp=2", "--max-num-seqs", "4",
                           "--max-num-batched-tokens", "32", "--kv-cache-memory", "8M", "--max-model-len", "128")
    try:
        from jaxserve.client import Client

        with Client(server.address, timeout=60) as client:
            info = client.model_info()
            assert (info.architecture, info.num_experts, info.num_experts_per_token) == ("qwen2_moe", 4, 2)
            assert client.server_info().mesh == "tp=1,ep=2,dp=2"
            result = client.generate([5, 6, 7, 8], max_tokens=8, temperature=0, ignore_eos=True)
            assert len(result.token_ids) == 8
    finally:
        server.stop()
    assert "experts 4/2" in server.output()


def test_an_ep_mesh_refuses_a_dense_model(tmp_path):
    dense = load_model(save_safetensors(make_hf_model("llama"), tmp_path / "llama"), dtype="float32", progress=False)
    with pytest.raises(ValueError, match="ep=2 splits a mixture-of-experts model's experts; this llama model has none"):
        Engine(dense, CONFIG, engine_mesh("ep=2"))
