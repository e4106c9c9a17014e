"""HF safetensors directories (one file or sharded with model.safetensors.index.json).

Files are memory-mapped and parsed here (the format is an 8-byte header length, a JSON header and
raw little-endian data), which reads bfloat16 without a framework and lets us validate offsets.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from jaxserve.checkpoint.names import IGNORED, ParamAssembler, name_index, transposed
from jaxserve.config import ModelConfig, load_hf_config
from jaxserve.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) for every tensor in one .safetensors file, memory-mapped."""
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
        header = json.loads(raw[8:8 + header_len].tobytes())
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None
    base = 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES.get(info["dtype"], np.void))
        if dtype == np.void or base + end > raw.size or end - start != dtype.itemsize * int(np.prod(info["shape"])):
            raise CheckpointError(f"{path} is corrupt: tensor {name!r} ({info['dtype']}) has bad offsets")
        yield name, raw[base + start:base + end].view(dtype).reshape(info["shape"])


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is corrupt ({e})") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{directory} is missing shards: {', '.join(absent)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no .safetensors files")
    return files


def load_safetensors_dir(directory: Path, dtype, progress=None) -> tuple[ModelConfig, dict]:
    """Reads config.json and all shards into the model's stacked numpy parameters."""
    directory = Path(directory)
    cfg = load_hf_config(directory / "config.json")
    index = name_index(cfg, "hf")
    assembler = ParamAssembler(cfg, dtype, str(directory), index)
    unexpected = []
    for path in safetensors_files(directory):
        for name, array in read_safetensors(path):
            if progress:
                progress(1)
            if name in index:
                ours, layer, expert = index[name]
                assembler.put(ours, layer, array, transposed(ours), expert)
            elif not any(name.endswith(s) for s in IGNORED) and not (cfg.tie_word_embeddings and name == "lm_head.weight"):
                unexpected.append(name)
    if unexpected:
        assembler.problems.append(f"unexpected tensors {', '.join(unexpected[:4])}"
                                  + (f" (+{len(unexpected) - 4})" if len(unexpected) > 4 else ""))
    return cfg, assembler.finish()
