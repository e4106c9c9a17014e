"""The attention implementations inside the model and the engine: the Pallas kernels (interpreted
on CPU) give the model the same logits and the engine the same tokens as the XLA path."""
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.checkpoint import load_model
from jaxserve.engine import Engine, EngineConfig
from jaxserve.ops.backends import select_attention_backend
from engine_runs import run_batch
from tiny_models import hf_logits, make_hf_model, our_logits, save_safetensors


@pytest.mark.parametrize("name, platform, impl", [
    ("auto", "cpu", "native"), ("auto", "tpu", "tpu"), ("auto", "gpu", "gpu"), ("xla", "gpu", "xla"),
    ("pallas", "tpu", "tpu"), ("pallas", "gpu", "gpu"), ("pallas", "cpu", "gpu-interpret")])
def test_backend_choice(name, platform, impl):
    assert select_attention_backend(name, platform=platform).name == impl


def test_unknown_backend():
    with pytest.raises(ValueError, match="attention backend must be one of auto, xla, native, pallas"):
        select_attention_backend("triton")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = make_hf_model("qwen2", seed=7)  # GQA, q/k/v biases
    return hf, load_model(save_safetensors(hf, tmp_path_factory.mktemp("tiny")), dtype="float32", progress=False)


@pytest.mark.parametrize("impl", ["tpu-interpret", "gpu-interpret"])
def test_kernels_inside_the_model_match_transformers(tiny, impl):
    """Prefill 19 tokens, then decode 3 one at a time through the kernel."""
    hf, ours = tiny
    ids = np.random.default_rng(3).integers(0, hf.config.vocab_size, 22).tolist()
    got = our_logits(ours, ids, split=19, attention_impl=impl)
    assert np.abs(got - hf_logits(hf, ids)).max() < 1e-4


@pytest.mark.slow
def test_engine_with_pallas_backend_and_quantized_pages(tiny):
    """Mixed prefill/decode steps through the GPU kernel (interpreted) on int8 pages: the same
    greedy tokens as the XLA path on the same pages."""
    _, model = tiny
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 17, 40)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outputs = {}
    for backend in ("xla", "pallas"):
        engine = Engine(model, EngineConfig(num_pages=32, max_num_seqs=4, max_num_batched_tokens=32,
                                            kv_cache_dtype="int8", attention_backend=backend))
        assert engine.info().attention_backend == ("xla" if backend == "xla" else "gpu-interpret")
        outputs[backend] = run_batch(engine, prompts, params)
    assert outputs["pallas"] == outputs["xla"]
    assert all(len(t) == 6 for t in outputs["xla"])
