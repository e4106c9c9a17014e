"""Pure model code. `forward` and `logits` are pure functions of (params, KV state, inputs)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.transformer import (ATTENTION_HEAD_AXES, KV_CHANNEL_AXES, KV_PAGE_AXES, ParamSpec, Transformer,
                                        empty_kv_pages, kv_page_axes, layer_param_specs, top_param_specs)
from jaxserve.ops.attention import AttentionMetadata
from jaxserve.ops.backends import XLA, AttentionBackend
from pallas_kernels.kv_quant import KVPages

__all__ = ["ATTENTION_HEAD_AXES", "AttentionMetadata", "KVPages", "KV_CHANNEL_AXES", "KV_PAGE_AXES", "ParamSpec",
           "Transformer", "abstract_model", "empty_kv_pages", "forward", "kv_page_axes", "logits", "param_specs"]


def abstract_model(cfg: ModelConfig, dtype=jnp.float32):
    """(graphdef, abstract state) of the model, allocating nothing."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), dtype)))


def param_specs(cfg: ModelConfig) -> dict:
    """Nested {name: ParamSpec} matching the model's pure-dict state (minus constants): the top-level
    parameters, then one dict of stacked layer parameters per layer group."""
    return {**top_param_specs(cfg), **{g.name: layer_param_specs(cfg, g) for g in cfg.layer_groups}}


def forward(graphdef, state, kv: KVPages, tokens, positions, meta: AttentionMetadata,
            backend: AttentionBackend = XLA, lmesh=None):
    """Pure forward over a flat token batch: hidden states [T, D] and the updated cache.
    lmesh: None on one device, else the LogicalMesh attention splits over (jaxserve.parallel)."""
    return nnx.merge(graphdef, state)(tokens, positions, kv, meta, backend, lmesh)


def logits(graphdef, state, hidden):
    return nnx.merge(graphdef, state).logits(hidden)
