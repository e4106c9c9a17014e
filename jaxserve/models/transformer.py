"""The decoder-only transformer (Llama, Mistral, Qwen2, Qwen3, SmolLM2) in Flax NNX.

Layer weights are stacked along a leading `layers` axis and run with `lax.scan`, so XLA compiles one
layer body however deep the model is (on CPU, bfloat16 stacks are held as bits: layers.as_stored).
Matrices are stored as [in, out]; matmuls go through layers.dense (float32 activations and sums).
Every parameter carries its logical axes (`logical_axes` metadata) for the sharding table.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models import layers as L
from jaxserve.ops.attention import AttentionPlan, attend, plan_attention, write_kv
from jaxserve.ops.backends import attention_impl
from jaxserve.ops.head_parallel import HeadParallel
from pallas_kernels.kv_quant import KVFormat, KVPages


def empty_kv_pages(cfg: ModelConfig, fmt: KVFormat, num_pages: int, page_size: int, k_chan=None, v_chan=None,
                   k_center=None):
    """The whole model's paged KV cache (see pallas_kernels/kv_quant.py) with every page zero."""
    return KVPages.zeros(fmt, cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, k_chan, v_chan,
                         k_center)


class AttentionMetadata(NamedTuple):
    """Where a flat batch of tokens belongs (see jaxserve/ops/attention.py for the contract)."""
    slot_mapping: jax.Array  # [tokens] flat KV slot each new token is written to
    kv_lens: jax.Array       # [seqs]
    page_tables: jax.Array   # [seqs, max_pages]
    cu_q_lens: jax.Array     # [seqs + 1]
    num_seqs: jax.Array      # []


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    init: str = "normal"  # normal | ones | zeros


def layer_param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every per-layer parameter, stacked over layers. The single description of the layer."""
    n, d, hd = cfg.num_layers, cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    specs = {
        "attn_norm": ParamSpec((n, d), ("layers", "embed"), "ones"),
        "wq": ParamSpec((n, d, q), ("layers", "embed", "q_heads")),
        "wk": ParamSpec((n, d, kv), ("layers", "embed", "kv_heads")),
        "wv": ParamSpec((n, d, kv), ("layers", "embed", "kv_heads")),
        "wo": ParamSpec((n, q, d), ("layers", "q_heads", "embed")),
        "mlp_norm": ParamSpec((n, d), ("layers", "embed"), "ones"),
    }
    if cfg.qkv_bias:
        specs["bq"] = ParamSpec((n, q), ("layers", "q_heads"), "zeros")
        specs["bk"] = ParamSpec((n, kv), ("layers", "kv_heads"), "zeros")
        specs["bv"] = ParamSpec((n, kv), ("layers", "kv_heads"), "zeros")
    if cfg.o_bias:
        specs["bo"] = ParamSpec((n, d), ("layers", "embed"), "zeros")
    if cfg.qk_norm:
        specs["q_norm"] = ParamSpec((n, hd), ("layers", "head_dim"), "ones")
        specs["k_norm"] = ParamSpec((n, hd), ("layers", "head_dim"), "ones")
    specs.update(ffn_param_specs(cfg))
    return specs


def ffn_param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """The FFN block's parameters. The MoE issue adds expert-stacked weights here."""
    if cfg.num_experts:
        raise NotImplementedError("MoE FFN blocks are not implemented yet")
    n, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    return {
        "w_gate": ParamSpec((n, d, f), ("layers", "embed", "ffw")),
        "w_up": ParamSpec((n, d, f), ("layers", "embed", "ffw")),
        "w_down": ParamSpec((n, f, d), ("layers", "ffw", "embed")),
    }


def top_param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    specs = {
        "embed": ParamSpec((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed")),
        "final_norm": ParamSpec((cfg.hidden_size,), ("embed",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
    return specs


def _make_param(spec: ParamSpec, key, dtype) -> nnx.Param:
    if spec.init == "ones":
        value = jnp.ones(spec.shape, dtype)
    elif spec.init == "zeros":
        value = jnp.zeros(spec.shape, dtype)
    else:
        value = (0.02 * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=spec.logical_axes)


def _make_params(module: nnx.Module, specs: dict[str, ParamSpec], rngs: nnx.Rngs, dtype):
    for name, spec in specs.items():
        setattr(module, name, _make_param(spec, rngs.params(), dtype))


def ffn(p: dict, x, cfg: ModelConfig):
    """The FFN block of one layer; the MoE block replaces this for expert models."""
    return L.swiglu(x, p["w_gate"], p["w_up"], p["w_down"])


def attention(q, kv: KVPages, layer, meta: AttentionMetadata, plan: AttentionPlan | None, impl: str,
              cfg: ModelConfig):
    """The XLA path (and the native decode kernel beside it) reuses the step's plan; kernels take the
    ragged metadata as it is."""
    opts = dict(sm_scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window)
    if plan is not None:
        return attend(q, kv, layer, plan, native_decode=impl == "native", **opts)
    return attention_impl(impl)(q, kv, layer, meta.kv_lens, meta.page_tables, meta.cu_q_lens, meta.num_seqs, **opts)


def cache_and_attend(q, k, v, kv: KVPages, layer, meta: AttentionMetadata, plan: AttentionPlan | None,
                     impl: str, cfg: ModelConfig, heads: HeadParallel | None):
    """Writes the layer's new k, v [T, kv_heads, head_dim] to the cache and attends with q [T, heads,
    head_dim]. Over a mesh (`heads`), each device does this for its own kv heads."""
    def run(q, k, v, kv, layer, meta, plan):
        kv = write_kv(kv, layer, k, v, meta.slot_mapping)
        return attention(q, kv, layer, meta, plan, impl, cfg), kv

    if heads is None:
        return run(q, k, v, kv, layer, meta, plan)
    return heads(run, q, k, v, kv, layer, meta, plan)


def decoder_layer(p: dict, x, kv: KVPages, layer, rope, meta: AttentionMetadata, plan: AttentionPlan | None,
                  impl: str, cfg: ModelConfig, heads: HeadParallel | None = None):
    """One layer over a flat token batch. x [T, D]; kv holds every layer's pages; `layer` picks ours."""
    t = x.shape[0]
    h = L.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q, k, v = L.dense(h, p["wq"]), L.dense(h, p["wk"]), L.dense(h, p["wv"])
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = L.rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = L.rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    cos, sin = rope
    q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
    attn, kv = cache_and_attend(q, k, v, kv, layer, meta, plan, impl, cfg, heads)
    attn = L.dense(attn.reshape(t, cfg.num_heads * cfg.head_dim), p["wo"])
    if cfg.o_bias:
        attn = attn + p["bo"]
    x = x + attn
    x = x + ffn(p, L.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps), cfg)
    return x, kv


class DecoderStack(nnx.Module):
    """All decoder layers, their weights stacked along axis 0."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype):
        self.cfg = cfg
        _make_params(self, layer_param_specs(cfg), rngs, dtype)

    def __call__(self, x, kv: KVPages, rope, meta: AttentionMetadata, impl: str, heads: HeadParallel | None):
        stacked = {name: getattr(self, name)[...] for name in layer_param_specs(self.cfg)}
        plan = None if impl not in ("xla", "native") else plan_attention(meta.kv_lens, meta.page_tables, meta.cu_q_lens,
                                                         meta.num_seqs, x.shape[0])

        def body(carry, xs):
            x, kv = carry
            p, layer = xs
            p = {name: L.weight(w) for name, w in p.items()}
            return decoder_layer(p, x, kv, layer, rope, meta, plan, impl, self.cfg, heads), None

        layers = jnp.arange(self.cfg.num_layers)
        (x, kv), _ = jax.lax.scan(body, (x, kv), (stacked, layers))
        return x, kv


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        _make_params(self, top_param_specs(cfg), rngs, dtype)
        self.layers = DecoderStack(cfg, rngs, dtype)

    def __call__(self, tokens, positions, kv: KVPages, meta: AttentionMetadata, attention_impl: str = "xla",
                 head_parallel: HeadParallel | None = None):
        """tokens, positions [T] int32 -> hidden states [T, D] (final norm applied), new cache.
        attention_impl: xla | native | tpu | gpu | gpu-interpret (jaxserve.ops.backends); head_parallel: how
        attention splits over a mesh (jaxserve.parallel.head_parallel), None on one device."""
        x = self.embed[...][tokens].astype(jnp.float32)  # the residual stream is float32 (see layers.py)
        rope = L.rope_cos_sin(positions, L.rope_inv_freq(self.cfg))  # inv_freq: a compile-time constant
        x, kv = self.layers(x, kv, rope, meta, attention_impl, head_parallel)
        return L.rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps), kv

    def logits(self, hidden):
        """hidden [..., D] -> float32 logits [..., vocab]."""
        if self.cfg.tie_word_embeddings:
            return L.dense_transposed(hidden, self.embed[...])
        return L.dense(hidden, self.lm_head[...])
