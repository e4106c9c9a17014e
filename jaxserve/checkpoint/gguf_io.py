"""GGUF files (llama.cpp): config from metadata, tensors dequantized by the `gguf` package.

llama.cpp's converter permutes the rows of Q and K of `llama`-architecture models so that RoPE rotates
interleaved pairs; we undo that and keep HF's rotate-half layout.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from jaxserve.checkpoint.names import IGNORED, LAYER_TENSORS, TOP_TENSORS, ParamAssembler, name_index
from jaxserve.config import ModelConfig, RopeScaling
from jaxserve.errors import CheckpointError, UnsupportedModelError

# GGUF general.architecture -> our architecture (Mistral GGUFs are written as "llama").
_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


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
    if meta.get(f"{arch}.expert_count"):
        raise UnsupportedModelError(f"mixture-of-experts GGUF models ({arch}) are not supported yet")
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
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
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
    )


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
    transposed = {n: t.transpose for n, t in {**TOP_TENSORS, **LAYER_TENSORS}.items()}
    permute_heads = {"wq": cfg.num_heads, "wk": cfg.num_kv_heads, "bq": cfg.num_heads, "bk": cfg.num_kv_heads}
    assembler = ParamAssembler(cfg, dtype, str(path))
    for tensor in reader.tensors:
        if progress:
            progress(1)
        if tensor.name not in index:
            if tensor.name not in IGNORED:
                assembler.problems.append(f"unexpected tensor {tensor.name}")
            continue
        ours, layer = index[tensor.name]
        array = dequantize(tensor)
        if cfg.architecture == "llama" and ours in permute_heads:
            array = unpermute_rope_rows(array, permute_heads[ours])
        assembler.put(ours, layer, array, transposed[ours])
    return cfg, assembler.finish()
