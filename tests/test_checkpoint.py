"""Configs from HF config.json layouts, and orbax checkpoints restored into a target sharding."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.checkpoint import convert, load_model
from jaxserve.config import RopeScaling, from_hf_config
from jaxserve.errors import CheckpointError, UnsupportedModelError
from jaxserve.models.layers import weight
from tiny_models import make_hf_model, our_logits, save_safetensors

LLAMA = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
             num_hidden_layers=1, num_attention_heads=2)


def test_transformers_4_and_5_rope_layouts_agree():
    old = from_hf_config({**LLAMA, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    new = from_hf_config({**LLAMA, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert old == new and new.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert new.num_kv_heads == 2 and new.head_dim == 4 and new.rope_theta == 5e5


@pytest.mark.parametrize("hf,error,match", [
    ({**LLAMA, "model_type": "gpt2"}, UnsupportedModelError, "unsupported architecture 'gpt2'"),
    ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedModelError, "yarn"),
    ({**LLAMA, "hidden_act": "gelu"}, UnsupportedModelError, "hidden_act"),
    ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, CheckpointError, "hidden_size"),
    ({**LLAMA, "num_key_value_heads": 3, "num_attention_heads": 4}, CheckpointError, "multiple"),
])
def test_bad_configs(hf, error, match):
    with pytest.raises(error, match=match):
        from_hf_config(hf)


def test_orbax_restores_straight_into_a_sharding(tmp_path):
    hf = make_hf_model("llama", seed=4)
    src = save_safetensors(hf, tmp_path / "st")
    convert(src, tmp_path / "ckpt", progress=False)
    reference = load_model(src, dtype="float32", progress=False)
    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))

    def shard_last_axis(a):  # split each array's last axis over 4 devices when it divides
        spec = [None] * (a.ndim - 1) + ["tp" if a.shape[-1] % 4 == 0 else None]
        return NamedSharding(mesh, PartitionSpec(*spec))

    shardings = jax.tree.map(shard_last_axis, nnx.to_pure_dict(reference.params))
    restored = load_model(tmp_path / "ckpt", dtype="float32", shardings=shardings, progress=False)
    wq = restored.params["layers"]["wq"][...]
    assert wq.sharding == shardings["layers"]["wq"] and len(wq.addressable_shards) == 4
    assert wq.addressable_shards[0].data.shape == (3, 64, 16)  # [layers, embed, q_heads / 4]
    for got, want in zip(jax.tree.leaves(nnx.to_pure_dict(restored.params)),
                         jax.tree.leaves(nnx.to_pure_dict(reference.params))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ids = list(range(3, 40))
    np.testing.assert_allclose(our_logits(restored, ids), our_logits(reference, ids), atol=1e-5)


def test_orbax_restores_in_bfloat16(tmp_path):
    hf = make_hf_model("qwen3", seed=4)
    convert(save_safetensors(hf, tmp_path / "st"), tmp_path / "ckpt", progress=False)
    loaded = load_model(tmp_path / "ckpt", dtype="bfloat16", progress=False)
    params = nnx.to_pure_dict(loaded.params)
    assert all(weight(a).dtype == jax.numpy.bfloat16 for a in jax.tree.leaves(params))
    # on CPU the layer stacks travel as bits through the layer scan (layers.as_stored)
    assert all(a.dtype == jax.numpy.uint16 for a in jax.tree.leaves(params["layers"]))


def test_processes_starting_together_convert_a_named_model_once(smollm2_gguf, tmp_path):
    """Two processes resolving `smollm2-135m` into an empty cache at the same moment (two servers,
    or test workers): one converts while the other waits on the folder's lock; both get the same
    checkpoint and no temporary sibling is left. (The GGUF is placed first, so nothing downloads.)"""
    import os
    import shutil
    import subprocess
    import sys

    (tmp_path / "smollm2-135m").mkdir()
    shutil.copy(smollm2_gguf, tmp_path / "smollm2-135m" / smollm2_gguf.name)
    code = "from jaxserve.checkpoint.registry import resolve_model; print(resolve_model('smollm2-135m', progress=False))"
    env = {**os.environ, "JAXSERVE_CACHE": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [(run.communicate(timeout=600), run.returncode) for run in runs]
    assert [code for _, code in results] == [0, 0], [err for (_, err), _ in results]
    assert {out.strip() for (out, _), _ in results} == {str(tmp_path / "smollm2-135m" / "orbax")}
    assert sorted(p.name for p in (tmp_path / "smollm2-135m").iterdir()) == [".lock", smollm2_gguf.name, "orbax"]
    assert load_model(tmp_path / "smollm2-135m" / "orbax", progress=False).config.num_layers == 30
