"""The decoder-only transformer (Llama, Mistral, Qwen2, Qwen3, SmolLM2; Mixtral, Qwen2-MoE and
Qwen3-MoE with mixture-of-experts FFNs: jaxserve/ops/moe.py) in Flax NNX.

Layers come in groups (ModelConfig.layer_groups): each group's weights are stacked along a leading
axis and run with `lax.scan`, so XLA compiles one layer body per group however deep the model is
(on CPU, bfloat16 stacks are held as bits: layers.as_stored); a model whose layers differ in kind
(dense and MoE FFNs) is several groups run one after the other. Matrices are stored as [in, out];
matmuls go through layers.dense (float32 activations and sums). Every parameter carries its logical
axes (`logical_axes` metadata) for the sharding table, and so do the KV pages and the attention
activations (below).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import LayerGroup, ModelConfig
from jaxserve.models import layers as L
from jaxserve.ops.attention import AttentionMetadata, write_kv
from jaxserve.ops.backends import AttentionBackend
from jaxserve.ops.moe import grouped_impl, routed_experts
from pallas_kernels.kv_formats import KVFormat
from pallas_kernels.kv_quant import KVPages

# Logical axes of the model's state and of attention's activations (parameters carry theirs in ParamSpec).
KV_PAGE_AXES = ("layers", "pages", "page_slots", "kv_heads", "head_dim")  # codes and block scales
KV_CHANNEL_AXES = ("layers", "kv_heads", "head_dim")                      # channel scales, key centers
ATTENTION_HEAD_AXES = ("tokens", "kv_heads", "head_dim")  # q, k, v and the output inside attention


def empty_kv_pages(cfg: ModelConfig, fmt: KVFormat, num_pages: int, page_size: int, k_chan=None, v_chan=None,
                   k_center=None):
    """The whole model's paged KV cache (see pallas_kernels/kv_quant.py) with every page zero."""
    return KVPages.zeros(fmt, cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, k_chan, v_chan,
                         k_center)


def kv_page_axes(kv: KVPages) -> KVPages:
    """The logical axes of each array of `kv` (a KVPages of axis tuples, None where absent)."""
    return kv.map(lambda field, _: KV_CHANNEL_AXES if field in ("k_chan", "v_chan", "k_center") else KV_PAGE_AXES)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    init: str = "normal"  # normal | ones | zeros


def layer_param_specs(cfg: ModelConfig, group: LayerGroup | None = None) -> dict[str, ParamSpec]:
    """Every per-layer parameter of a group (default: the first), stacked over its layers. The single
    description of the layer."""
    group = group or cfg.layer_groups[0]
    n, d, hd = group.count, cfg.hidden_size, cfg.head_dim
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
    specs.update(ffn_param_specs(cfg, group))
    return specs


def ffn_param_specs(cfg: ModelConfig, group: LayerGroup) -> dict[str, ParamSpec]:
    """The FFN block's parameters for the group's kind: a SwiGLU ("dense"), or a router and
    experts stacked [layers, experts, ...] plus an optional shared expert ("moe")."""
    n, d = group.count, cfg.hidden_size
    if group.kind == "dense":
        return swiglu_specs(n, d, cfg.intermediate_size, "ffw", "w")
    e, f = cfg.num_experts, cfg.moe_intermediate_size
    specs = {
        "router": ParamSpec((n, d, e), ("layers", "embed", "router")),
        "we_gate": ParamSpec((n, e, d, f), ("layers", "experts", "embed", "moe_ffw")),
        "we_up": ParamSpec((n, e, d, f), ("layers", "experts", "embed", "moe_ffw")),
        "we_down": ParamSpec((n, e, f, d), ("layers", "experts", "moe_ffw", "embed")),
    }
    if cfg.shared_expert_intermediate_size:
        specs.update(swiglu_specs(n, d, cfg.shared_expert_intermediate_size, "shared_ffw", "ws"))
        specs["ws_router"] = ParamSpec((n, d, 1), ("layers", "embed", "router"))  # the shared expert's gate
    return specs


def moe_layer_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """The logical axes of one MoE layer's parameters (inside the layer scan: no "layers" axis)."""
    return {name: spec.logical_axes[1:] for name, spec in ffn_param_specs(cfg, LayerGroup("", "moe", 0, 1)).items()}


def swiglu_specs(n: int, d: int, f: int, ffw_axis: str, prefix: str) -> dict[str, ParamSpec]:
    return {
        f"{prefix}_gate": ParamSpec((n, d, f), ("layers", "embed", ffw_axis)),
        f"{prefix}_up": ParamSpec((n, d, f), ("layers", "embed", ffw_axis)),
        f"{prefix}_down": ParamSpec((n, f, d), ("layers", ffw_axis, "embed")),
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


def ffn(p: dict, x, kind: str, ctx: "StepContext"):
    """The FFN block of one layer of the group's kind (ffn_param_specs lists its parameters)."""
    if kind == "dense":
        return L.swiglu(x, p["w_gate"], p["w_up"], p["w_down"])
    out = routed_experts(p, x, ctx.cfg, grouped_impl(ctx.backend.name), ctx.lmesh, moe_layer_axes(ctx.cfg))
    if ctx.cfg.shared_expert_intermediate_size:   # Qwen2-MoE: a dense expert every token runs, sigmoid-gated
        gate = jax.nn.sigmoid(L.dense(x, p["ws_router"]))   # [T, 1]
        out = out + gate * L.swiglu(x, p["ws_gate"], p["ws_up"], p["ws_down"])
    return out


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What every layer of one forward shares, static parts and per-step arrays alike."""
    cfg: ModelConfig
    backend: AttentionBackend
    lmesh: object | None        # jaxserve.parallel.LogicalMesh that splits attention, or None (one device)
    meta: AttentionMetadata
    prepared: object            # backend.prepare(meta): the step's attention plan
    rope: tuple                 # cos, sin [T, head_dim]


def cache_and_attend(q, k, v, kv: KVPages, layer, ctx: StepContext):
    """Writes the layer's new k, v [T, kv_heads, head_dim] to the cache and attends with q [T, heads,
    head_dim]. Over a mesh, each device does this for its own kv heads (no communication)."""
    cfg, backend = ctx.cfg, ctx.backend

    def run(q, k, v, kv, layer, slot_mapping, prepared):
        kv = write_kv(kv, layer, k, v, slot_mapping)
        out = backend(q, kv, layer, prepared, sm_scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window)
        return out, kv

    args = (q, k, v, kv, layer, ctx.meta.slot_mapping, ctx.prepared)
    if ctx.lmesh is None or not ctx.lmesh.splits:
        return run(*args)
    kv_axes = kv_page_axes(kv)
    heads = ATTENTION_HEAD_AXES
    return ctx.lmesh.shard_map(run, in_axes=(heads, heads, heads, kv_axes, (), (), ()),
                               out_axes=(heads, kv_axes))(*args)


def decoder_layer(p: dict, x, kv: KVPages, layer, kind: str, ctx: StepContext):
    """One layer over a flat token batch. x [T, D]; kv holds every layer's pages; `layer` picks ours."""
    cfg, t = ctx.cfg, x.shape[0]
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
    cos, sin = ctx.rope
    q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
    attn, kv = cache_and_attend(q, k, v, kv, layer, ctx)
    attn = L.dense(attn.reshape(t, cfg.num_heads * cfg.head_dim), p["wo"])
    if cfg.o_bias:
        attn = attn + p["bo"]
    x = x + attn
    x = x + ffn(p, L.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps), kind, ctx)
    return x, kv


class DecoderStack(nnx.Module):
    """One group of decoder layers, their weights stacked along axis 0."""

    def __init__(self, cfg: ModelConfig, group: LayerGroup, rngs: nnx.Rngs, dtype):
        self.cfg, self.group = cfg, group
        _make_params(self, layer_param_specs(cfg, group), rngs, dtype)

    def __call__(self, x, kv: KVPages, ctx: StepContext):
        stacked = {name: getattr(self, name)[...] for name in layer_param_specs(self.cfg, self.group)}
        kind = self.group.kind

        def body(carry, xs):
            x, kv = carry
            p, layer = xs
            p = {name: L.weight(w) for name, w in p.items()}
            return decoder_layer(p, x, kv, layer, kind, ctx), None

        layers = jnp.arange(self.group.start, self.group.start + self.group.count)
        (x, kv), _ = jax.lax.scan(body, (x, kv), (stacked, layers))
        return x, kv


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        _make_params(self, top_param_specs(cfg), rngs, dtype)
        for group in cfg.layer_groups:
            setattr(self, group.name, DecoderStack(cfg, group, rngs, dtype))

    def __call__(self, tokens, positions, kv: KVPages, meta: AttentionMetadata, backend: AttentionBackend,
                 lmesh=None):
        """tokens, positions [T] int32 -> hidden states [T, D] (final norm applied), new cache.
        backend: the attention implementation (jaxserve.ops.backends); lmesh: the LogicalMesh attention
        splits over (jaxserve.parallel), None on one device."""
        x = self.embed[...][tokens].astype(jnp.float32)  # the residual stream is float32 (see layers.py)
        rope = L.rope_cos_sin(positions, L.rope_inv_freq(self.cfg))  # inv_freq: a compile-time constant
        ctx = StepContext(self.cfg, backend, lmesh, meta, backend.prepare(meta, tokens.shape[0]), rope)
        for group in self.cfg.layer_groups:
            x, kv = getattr(self, group.name)(x, kv, ctx)
        return L.rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps), kv

    def logits(self, hidden):
        """hidden [..., D] -> float32 logits [..., vocab]."""
        if self.cfg.tie_word_embeddings:
            return L.dense_transposed(hidden, self.embed[...])
        return L.dense(hidden, self.lm_head[...])
