"""Pure model code. `forward` and `logits` are pure functions of (params, KV state, inputs)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.transformer import (AttentionMetadata, ParamSpec, Transformer, empty_kv_pages,
                                        layer_param_specs, top_param_specs)
from pallas_kernels.kv_quant import KVPages

__all__ = ["AttentionMetadata", "KVPages", "empty_kv_pages", "ParamSpec", "Transformer", "abstract_model", "forward", "logits", "param_specs"]


def abstract_model(cfg: ModelConfig, dtype=jnp.float32):
    """(graphdef, abstract state) of the model, allocating nothing."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), dtype)))


def param_specs(cfg: ModelConfig) -> dict:
    """Nested {name: ParamSpec} matching the model's pure-dict state (minus constants)."""
    return {**top_param_specs(cfg), "layers": layer_param_specs(cfg)}


def forward(graphdef, state, kv: KVPages, tokens, positions, meta: AttentionMetadata, attention_impl: str = "xla",
            head_parallel=None):
    """Pure forward over a flat token batch: hidden states [T, D] and the updated cache.
    head_parallel: None on one device, else how attention splits over the mesh (jaxserve.parallel)."""
    return nnx.merge(graphdef, state)(tokens, positions, kv, meta, attention_impl, head_parallel)


def logits(graphdef, state, hidden):
    return nnx.merge(graphdef, state).logits(hidden)
