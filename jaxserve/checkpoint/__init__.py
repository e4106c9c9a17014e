"""Loading models from the formats users have: HF safetensors dirs, GGUF files, jaxserve orbax dirs.

`load_model(name_or_path)` returns config, parameters on device, and tokenizer, whatever the format.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from jaxserve.checkpoint.gguf_io import load_gguf, open_gguf
from jaxserve.checkpoint.names import numpy_dtype
from jaxserve.checkpoint.orbax_io import (check_destination, is_orbax_checkpoint, load_orbax_config, restore_orbax,
                                          save_orbax)
from jaxserve.checkpoint.registry import resolve_model
from jaxserve.checkpoint.safetensors_io import load_safetensors_dir
from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError
from jaxserve.models import abstract_model
from jaxserve.models.layers import as_stored
from jaxserve.parallel.placement import param_shardings, place
from jaxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State      # jax arrays, placed by `shardings`; on CPU bfloat16 layer weights are held
    #                        as their uint16 bits (jaxserve.models.layers.as_stored / weight)
    tokenizer: Tokenizer | None
    dtype: str
    name: str = ""         # what it was loaded as: a known model name or a checkpoint path

    def with_router_options(self, **options) -> LoadedModel:
        """The same weights with MoE router options (ModelConfig.moe_min_router_weight, moe_top_p)
        set; the model's structure is static, so its graphdef is rebuilt for the new config."""
        if not options:
            return self
        if not self.config.num_experts:
            raise ValueError(f"{', '.join(options)} applies to mixture-of-experts models; "
                             f"{self.name or 'this model'} ({self.config.architecture}) has no experts")
        cfg = dataclasses.replace(self.config, **options)
        graphdef, _ = abstract_model(cfg, jnp.dtype(self.dtype))
        return dataclasses.replace(self, config=cfg, graphdef=graphdef)


def resolve_dtype(dtype: str) -> str:
    """"auto" is float32 on CPU (XLA:CPU bfloat16 matmuls are slow) and bfloat16 on accelerators."""
    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype not in ("float32", "bfloat16"):
        raise CheckpointError(f"dtype must be auto, float32 or bfloat16, not {dtype!r}")
    return dtype


def checkpoint_format(path: Path) -> str:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        with open(path, "rb") as f:
            if path.suffix == ".gguf" or f.read(4) == b"GGUF":
                return "gguf"
        raise CheckpointError(f"{path} is not a GGUF file (expected a .gguf file or a checkpoint directory)")
    if is_orbax_checkpoint(path):
        return "orbax"
    if (path / "config.json").exists():
        return "safetensors"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise CheckpointError(f"{path} is not a checkpoint: expected config.json + *.safetensors, "
                          "a .gguf file, or a jaxserve orbax directory")


def read_numpy_checkpoint(path: Path, dtype: str, progress: bool = True):
    """(config, numpy params, tokenizer) from a safetensors dir or GGUF file, with a progress bar."""
    fmt = checkpoint_format(path)
    if fmt == "gguf" and path.is_dir():
        path = next(path.glob("*.gguf"))
    # disable=None: a bar on terminals only, so logs and pipes stay clean
    with tqdm(desc=f"reading {path.name}", unit="tensor", disable=None if progress else True, leave=False) as bar:
        if fmt == "gguf":
            reader = open_gguf(path)
            bar.total = len(reader.tensors)
            cfg, params = load_gguf(reader, dtype, bar.update)
            has_tokenizer = "tokenizer.ggml.tokens" in reader.fields
            return cfg, params, Tokenizer.from_gguf(reader) if has_tokenizer else None
        if fmt == "safetensors":
            cfg, params = load_safetensors_dir(path, dtype, bar.update)
            tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
            return cfg, params, tok
    raise CheckpointError(f"{path} is already a jaxserve checkpoint")


def _abstract_params(cfg: ModelConfig, dtype: str, shardings, mesh):
    graphdef, state = abstract_model(cfg, jnp.dtype(dtype))
    pure = nnx.to_pure_dict(state)
    if mesh is not None:
        shardings = param_shardings(cfg, mesh)
    elif callable(shardings):  # built from the config, e.g. lambda cfg: param_shardings(cfg, mesh)
        shardings = shardings(cfg)
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: default, pure)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure, shardings)
    return graphdef, state, abstract


def load_model(model: str | Path, dtype: str = "auto", shardings=None, progress: bool = True,
               mesh=None) -> LoadedModel:
    """Loads a named default model or a local checkpoint, every array straight into its sharding:
    `mesh` (a jax Mesh: the logical-axis table's placement, jaxserve.parallel.param_shardings), or
    `shardings` (a pytree of shardings matching the params' pure dict, or a function of the
    ModelConfig returning one); default: the first device."""
    if mesh is not None and shardings is not None:
        raise ValueError("load_model takes a mesh or shardings, not both")
    dtype = resolve_dtype(dtype)
    path = resolve_model(str(model), progress=progress)
    fmt = checkpoint_format(path)
    if fmt == "orbax":
        cfg = load_orbax_config(path)
        graphdef, state, abstract = _abstract_params(cfg, dtype, shardings, mesh)
        arrays = restore_orbax(path, abstract)
        tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
    else:
        cfg, arrays, tok = read_numpy_checkpoint(path, dtype, progress)
        graphdef, state, abstract = _abstract_params(cfg, dtype, shardings, mesh)
        arrays = place(arrays, jax.tree.map(lambda a: a.sharding, abstract))
    if jax.default_backend() == "cpu":
        for group in cfg.layer_groups:
            arrays[group.name] = {name: as_stored(w) for name, w in arrays[group.name].items()}
    nnx.replace_by_pure_dict(state, arrays)
    log.info("loaded %s (%s, %s): %d layers, %.1fM params", model, fmt, dtype, cfg.num_layers,
             sum(a.size for a in jax.tree.leaves(arrays)) / 1e6)
    return LoadedModel(cfg, graphdef, state, tok, dtype, str(model))


def convert(src: Path, dst: Path, dtype: str = "float32", progress: bool = True) -> Path:
    """Converts a safetensors dir or GGUF file into a jaxserve orbax checkpoint at `dst`."""
    dtype = resolve_dtype(dtype)
    check_destination(dst)  # before reading anything
    cfg, params, tok = read_numpy_checkpoint(Path(src), dtype, progress)
    if progress:  # status goes to stderr: stdout is the command's answer (e.g. --json)
        tqdm.write(f"writing {dst}", file=sys.stderr)
    save_orbax(Path(dst), cfg, params, tok, dtype)
    return Path(dst)


__all__ = ["LoadedModel", "checkpoint_format", "convert", "load_model", "numpy_dtype", "resolve_dtype"]
