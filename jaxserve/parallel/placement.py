"""Where the engine's arrays live on a mesh, all derived from the axis table in rules.py: parameters
(from ParamSpec.logical_axes), KV pages, and the attention split."""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxserve.checkpoint import LoadedModel
from jaxserve.config import ModelConfig
from jaxserve.models import ParamSpec, abstract_model, param_specs
from jaxserve.ops.head_parallel import HeadParallel
from jaxserve.parallel.rules import (
    ATTENTION_HEAD_AXES,
    KV_CHANNEL_AXES,
    KV_PAGE_AXES,
    describe_placement,
    logical_sharding,
    partition_spec,
)
from pallas_kernels.kv_quant import KVPages

log = logging.getLogger(__name__)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """NamedShardings matching the params' pure dict (for load_model(..., shardings=...))."""
    return jax.tree.map(lambda spec: logical_sharding(spec.logical_axes, cfg, mesh), param_specs(cfg),
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def _attention_split(cfg: ModelConfig, mesh: Mesh) -> HeadParallel:
    return HeadParallel(mesh, partition_spec(ATTENTION_HEAD_AXES, cfg, mesh),
                        partition_spec(KV_PAGE_AXES, cfg, mesh), partition_spec(KV_CHANNEL_AXES, cfg, mesh))


def head_parallel(cfg: ModelConfig, mesh: Mesh | None) -> HeadParallel | None:
    """How attention splits over `mesh`; None without a mesh or on one device (nothing to split)."""
    return None if mesh is None or mesh.size == 1 else _attention_split(cfg, mesh)


def kv_shardings(cfg: ModelConfig, mesh: Mesh, kv: KVPages) -> KVPages:
    """NamedShardings of KV pages (arrays or ShapeDtypeStructs): kv heads split when they divide,
    exactly as attention reads them."""
    specs = _attention_split(cfg, mesh).kv_specs(kv)
    return KVPages(*(None if s is None else NamedSharding(mesh, s) for s in specs))


def _on_shardings(pure: dict, shardings: dict) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, pure, shardings)))


def shard_params(model: LoadedModel, mesh: Mesh) -> LoadedModel:
    """The model with its parameters placed by the axis table on `mesh` (unchanged if they already are)."""
    cfg = model.config
    shardings = param_shardings(cfg, mesh)
    pure = nnx.to_pure_dict(model.params)
    if _on_shardings(pure, shardings):
        return model
    _, state = abstract_model(cfg, jnp.dtype(model.dtype))
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.device_put, pure, shardings))
    return dataclasses.replace(model, params=state)


def log_placement(cfg: ModelConfig, mesh: Mesh):
    log.info("%s", describe_placement(cfg, mesh))
