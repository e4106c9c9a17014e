"""GGUF files (llama.cpp): config from metadata, tensors dequantized by the `gguf` package.

llama.cpp's converter permutes the rows of Q and K of `llama`-architecture models so that RoPE rotates
interleaved pairs; we undo that and keep HF's rotate-half layout.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from jaxserve.checkpoint.names import IGNORED, ParamAssembler, name_index, transposed
from jaxserve.config import ModelConfig, RopeScaling
from jaxserve.errors import CheckpointError, UnsupportedModelError

# GGUF general.architecture -> our architecture (Mistral GGUFs are written as "llama", and so are
# Mixtral's, with an expert count).
_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                  "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# Whether the chosen experts' weights are renormalized, where the file does not say
# ({arch}.expert_weights_norm): as llama.cpp runs these architectures.
_NORM_TOPK_DEFAULT = {"llama": True, "qwen2moe": False, "qwen3moe": True}


def open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # the reader raises ValueError, KeyError, struct errors... on bad files
        if "GGMLQuantizationType" in str(e):
            raise UnsupportedModelError(f"{path} uses an unknown GGUF tensor type ({e})") from None
        raise CheckpointError(f"{path} is not a valid GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader: gguf.GGUFReader) -> dict:
    """GGUF key-value metadata as plain Python values (the big token tables are skipped)."""
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def config_from_gguf(reader: gguf.GGUFReader) -> ModelConfig:
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; jaxserve supports "
                                    + ", ".join(_ARCHITECTURES))
    tensors = {t.name: t for t in reader.tensors}

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    elif kind != "none":
        raise UnsupportedModelError(f"unsupported GGUF rope scaling type {kind!r}")
    freq_factors = None
    if "rope_freqs.weight" in tensors:  # llama3-style scaling, stored as per-frequency divisors
        freq_factors = tuple(float(x) for x in np.asarray(tensors["rope_freqs.weight"].data).ravel())
    moe = _moe_from_gguf(meta, arch, tensors, int(get("block_count")), get)
    return ModelConfig(
        architecture="mixtral" if arch == "llama" and moe else _ARCHITECTURES[arch],
        vocab_size=int(meta.get(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_freq_factors=freq_factors,
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        **moe,
    )


def _moe_from_gguf(meta: dict, arch: str, tensors: dict, num_layers: int, get) -> dict:
    """The MoE fields from {arch}.expert_* metadata ({} for a dense model). A layer with a dense
    FFN (blk.N.ffn_gate, feed_forward_length wide) and no router (blk.N.ffn_gate_inp) is dense.
    Widths the metadata leaves out are read off the tensors, as llama.cpp files vary."""
    experts = int(meta.get(f"{arch}.expert_count") or 0)
    if not experts:
        return {}
    if arch not in _NORM_TOPK_DEFAULT:
        raise UnsupportedModelError(f"mixture-of-experts GGUF models of architecture {arch!r} are not supported")
    if "blk.0.ffn_gate.0.weight" in tensors:
        raise UnsupportedModelError("this GGUF stores one tensor per expert (blk.N.ffn_gate.J.weight, an old "
                                    "llama.cpp layout); convert it again with a current llama.cpp")
    dense = tuple(i for i in range(num_layers)
                  if f"blk.{i}.ffn_gate_inp.weight" not in tensors and f"blk.{i}.ffn_gate.weight" in tensors)
    first_moe = next((i for i in range(num_layers) if i not in dense), 0)

    def width(key: str, tensor: str) -> int:   # GGUF lists dims innermost first: [in, out(, experts)]
        value = meta.get(f"{arch}.{key}")
        t = tensors.get(f"blk.{first_moe}.{tensor}.weight")
        return int(value) if value else int(t.shape[1]) if t is not None else 0

    return dict(num_experts=experts, num_experts_per_token=int(get("expert_used_count")),
                moe_intermediate_size=width("expert_feed_forward_length", "ffn_gate_exps"),
                shared_expert_intermediate_size=width("expert_shared_feed_forward_length", "ffn_gate_shexp"),
                norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", _NORM_TOPK_DEFAULT[arch])),
                dense_layers=dense)


def gguf_architecture(reader: gguf.GGUFReader) -> str:
    return reader.fields["general.architecture"].contents()


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: per head, rows [pair0_a, pair0_b, ...] -> [all a, all b]."""
    shape = w.shape
    return w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def dequantize(tensor) -> np.ndarray:
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UnsupportedModelError(
            f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot be dequantized") from None
    return np.asarray(array, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def load_gguf(reader: gguf.GGUFReader, dtype, progress=None) -> tuple[ModelConfig, dict]:
    """Reads an opened GGUF file into (config, stacked numpy params). `progress(n)` is called per tensor."""
    path = reader.data.filename
    cfg = config_from_gguf(reader)
    index = name_index(cfg, "gguf")
    permute_heads = {"wq": cfg.num_heads, "wk": cfg.num_kv_heads, "bq": cfg.num_heads, "bk": cfg.num_kv_heads}
    if gguf_architecture(reader) != "llama":  # only llama.cpp's llama converter permutes Q and K
        permute_heads = {}
    assembler = ParamAssembler(cfg, dtype, str(path), index)
    for tensor in reader.tensors:
        if progress:
            progress(1)
        if tensor.name not in index:
            if tensor.name not in IGNORED:
                assembler.problems.append(f"unexpected tensor {tensor.name}")
            continue
        ours, layer, _ = index[tensor.name]
        array = dequantize(tensor)
        if ours in permute_heads:
            array = unpermute_rope_rows(array, permute_heads[ours])
        assembler.put(ours, layer, array, transposed(ours))
    return cfg, assembler.finish()
