"""GGUF loading: llama.cpp's Q/K permutation undone, every dequantizable tensor type, clear errors."""
import gguf
import numpy as np
import pytest

from jaxserve.checkpoint import load_model
from jaxserve.checkpoint.gguf_io import load_gguf, open_gguf
from jaxserve.errors import CheckpointError, UnsupportedModelError
from tiny_models import hf_logits, make_hf_model, our_logits, write_gguf

Q = gguf.GGMLQuantizationType
DEQUANTIZABLE = [t for t in Q if t in gguf.quants._type_traits]


@pytest.mark.parametrize("variant", ["llama", "smollm2", "qwen2", "qwen3"])
def test_f32_gguf_matches_transformers(variant, tmp_path):
    hf = make_hf_model(variant, seed=11)
    ours = load_model(write_gguf(hf, tmp_path / "m.gguf"), dtype="float32", progress=False)
    ids = np.random.default_rng(2).integers(0, hf.config.vocab_size, 17).tolist()
    assert np.abs(our_logits(ours, ids) - hf_logits(hf, ids)).max() < 1e-4


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_weights_load_as_their_dequantized_values(qtype, tmp_path):
    hf = make_hf_model("llama", seed=1, intermediate_size=256, hidden_size=64)
    path = write_gguf(hf, tmp_path / "m.gguf", tensor_type=qtype)
    _, params = load_gguf(open_gguf(path), "float32")
    w_up = hf.model.layers[1].mlp.up_proj.weight.detach().numpy()  # [out, in]
    expected = gguf.quants.dequantize(gguf.quants.quantize(w_up, qtype), qtype)
    np.testing.assert_array_equal(params["layers"]["w_up"][1], expected.T)
    assert np.abs(expected - w_up).max() < 0.1  # and they are a real approximation of the weights


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random blocks may hold NaN scales
@pytest.mark.parametrize("qtype", DEQUANTIZABLE, ids=lambda t: t.name)
def test_every_dequantizable_type_loads(qtype, tmp_path):
    """Random blocks of each type in one tensor; the loader must return exactly gguf's dequantization."""
    hf = make_hf_model("llama", seed=2, intermediate_size=256)
    block, type_size = gguf.constants.GGML_QUANT_SIZES[qtype]
    rows, cols = 64, 256  # ffn_down is [hidden, intermediate] in GGUF's numpy order
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block * type_size), dtype=np.uint8)
    path = write_gguf(hf, tmp_path / "m.gguf", raw_overrides={"blk.0.ffn_down.weight": (raw, qtype)})
    _, params = load_gguf(open_gguf(path), "float32")
    expected = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    np.testing.assert_array_equal(params["layers"]["w_down"][0], expected.T)


def test_type_that_cannot_be_dequantized_is_a_clear_error(tmp_path):
    hf = make_hf_model("llama", seed=2)
    raw = np.zeros((64, 96), np.int8).view(np.uint8)
    path = write_gguf(hf, tmp_path / "m.gguf", raw_overrides={"blk.0.ffn_up.weight": (raw, Q.I8)})
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_up\.weight has type I8"):
        load_model(path, progress=False)


def corrupt_tensor_type(path, tensor_name: str, type_id: int):
    """Rewrites the type field of one tensor-info record (name, n_dims u32, dims u64[], type u32)."""
    data = bytearray(path.read_bytes())
    at = data.index(tensor_name.encode()) + len(tensor_name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    data[at:at + 4] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_unknown_tensor_type_is_a_clear_error(tmp_path):
    path = write_gguf(make_hf_model("llama", seed=2), tmp_path / "m.gguf")
    corrupt_tensor_type(path, "blk.1.ffn_up.weight", 250)
    with pytest.raises(UnsupportedModelError, match="unknown GGUF tensor type"):
        load_model(path, progress=False)


def test_truncated_file_is_a_checkpoint_error(tmp_path):
    path = write_gguf(make_hf_model("llama", seed=2), tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a valid GGUF file"):
        load_model(path, progress=False)


def test_unsupported_gguf_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(tmp_path / "m.gguf", progress=False)
