"""Tiny random-weight HF models of every supported architecture, and ways to write them to disk."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Small but not degenerate: GQA (4 query heads over 2 KV heads), several layers, odd vocab.
BASE = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, tie_word_embeddings=False)

VARIANTS = {
    "llama": ("LlamaConfig", {}),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True)),
    "llama3-rope": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=32))),
    "llama-linear-rope": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=10000.0))),
    "llama2-mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "smollm2": ("LlamaConfig", dict(tie_word_embeddings=True, num_attention_heads=6, num_key_value_heads=2,
                                     hidden_size=48, rope_parameters=dict(rope_type="default", rope_theta=100000.0))),
    "mistral": ("MistralConfig", dict(sliding_window=5, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, attention_bias=False)),
    # Mixture of experts: top-2 of 4, renormalized; a sigmoid-gated shared expert, top-k weights as
    # they come; 6 experts with a dense layer (1) between MoE layers.
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=80, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=32,
                                         mlp_only_layers=[1], norm_topk_prob=True)),
}
MOE_VARIANTS = ("mixtral", "qwen2_moe", "qwen3_moe")


def make_hf_model(variant: str, seed: int = 0, **overrides):
    """A float32 HF model whose every weight (norms included) is random, so mixing up tensors shows."""
    import torch
    import transformers

    cls_name, extra = VARIANTS[variant]
    config = getattr(transformers, cls_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def save_safetensors(model, directory: Path, max_shard_size=None, tokenizer=None) -> Path:
    """config.json + safetensors (sharded when max_shard_size is given) without transformers' GGUF
    bookkeeping, so it works for models transformers loaded from GGUF too. MoE models go through
    save_pretrained, which writes one tensor per expert as published checkpoints have them."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if model.config.model_type in MOE_VARIANTS:
        model.save_pretrained(directory, max_shard_size=max_shard_size or "10GB")
        if tokenizer is not None:
            tokenizer.save(directory)
        return directory
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if max_shard_size is None:
        save_file(state, directory / "model.safetensors")
    else:
        names, shards = sorted(state), {}
        for i in range(0, len(names), max_shard_size):
            shards[f"model-{i // max_shard_size:05d}.safetensors"] = names[i:i + max_shard_size]
        for file, keys in shards.items():
            save_file({k: state[k] for k in keys}, directory / file)
        index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def _permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert permutation (the inverse of what our loader undoes), written from its spec."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


# MoE tensors of transformers' in-memory layout (experts fused: gate_up_proj [E, 2F, D], down_proj [E, D, F]).
MOE_HF_TO_GGUF = {
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight", "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{LAYER_HF_TO_GGUF.get(rest) or MOE_HF_TO_GGUF[rest]}"


def gguf_tensors(model):
    """(gguf name, float32 array) of every tensor, MoE experts stacked as llama.cpp stores them:
    ffn_{gate,up,down}_exps [E, out, in] and the shared expert's gate as a vector [D]."""
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = gguf_name(name.replace("experts.gate_up_proj", "gate.weight")).removesuffix("ffn_gate_inp.weight")
            half = array.shape[1] // 2
            yield prefix + "ffn_gate_exps.weight", np.ascontiguousarray(array[:, :half])
            yield prefix + "ffn_up_exps.weight", np.ascontiguousarray(array[:, half:])
        elif name.endswith("shared_expert_gate.weight"):
            yield gguf_name(name), array.reshape(-1)
        else:
            yield gguf_name(name), array


def _add_moe_metadata(w, cfg):
    w.add_expert_count(cfg.num_local_experts if cfg.model_type == "mixtral" else cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.model_type != "mixtral":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    if getattr(cfg, "shared_expert_intermediate_size", 0):
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def write_gguf(model, path: Path, tensor_type=None, raw_overrides=None) -> Path:
    """Writes an HF llama-family model as a llama.cpp-style GGUF (Q/K rows permuted for `llama`).

    tensor_type: a GGMLQuantizationType to quantize 2-D weights with (default F32).
    raw_overrides: {gguf name: (raw uint8 bytes array, GGMLQuantizationType)} written as given.
    """
    import gguf

    cfg = model.config
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "llama",
            "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[cfg.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.model_type in MOE_VARIANTS:
        _add_moe_metadata(w, cfg)
    raw_overrides = raw_overrides or {}
    for gname, array in gguf_tensors(model):
        if gname == "output.weight" and cfg.tie_word_embeddings:
            continue
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
            array = _permute_rope_rows(array, cfg.num_attention_heads)
        if arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
            array = _permute_rope_rows(array, cfg.num_key_value_heads)
        if gname in raw_overrides:
            raw, qtype = raw_overrides[gname]
            w.add_tensor(gname, raw, raw_dtype=qtype)
        elif tensor_type is not None and array.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)
        else:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _forward_logits(graphdef, impl: str, params, kv, tokens, positions, meta):
    from jaxserve.models import forward, logits
    from jaxserve.ops.backends import AttentionBackend

    hidden, kv = forward(graphdef, params, kv, tokens, positions, meta, AttentionBackend(impl))
    return logits(graphdef, params, hidden), kv


_FORWARD_LOGITS = {}  # jitted once per process: calls on the same model shapes share compiled programs


def our_logits(loaded, ids, split: int | None = None, page_size: int = 16, attention_impl: str = "xla") -> np.ndarray:
    """Logits [T, vocab] from jaxserve's forward over the paged cache, for one sequence. With `split`,
    the first `split` tokens are prefilled and the rest fed one at a time through the KV pages, which
    must give the same numbers. attention_impl: the name of a jaxserve.ops.backends.AttentionBackend."""
    import jax
    import jax.numpy as jnp

    from jaxserve.models import AttentionMetadata, empty_kv_pages
    from pallas_kernels.kv_quant import kv_format

    if not _FORWARD_LOGITS:
        _FORWARD_LOGITS["step"] = jax.jit(_forward_logits, static_argnums=(0, 1))
    step = _FORWARD_LOGITS["step"]
    num_pages = -(-len(ids) // page_size)
    pages = np.arange(1, num_pages + 1, dtype=np.int32)  # page 0 is the null page
    kv = empty_kv_pages(loaded.config, kv_format("auto", loaded.dtype), num_pages + 1, page_size)
    chunks = [ids] if split is None else [ids[:split]] + [[t] for t in ids[split:]]
    out, start = [], 0
    for chunk in chunks:
        positions = np.arange(start, start + len(chunk), dtype=np.int32)
        meta = AttentionMetadata(
            slot_mapping=jnp.asarray(pages[positions // page_size] * page_size + positions % page_size),
            kv_lens=jnp.asarray([start + len(chunk)], jnp.int32), page_tables=jnp.asarray(pages[None]),
            cu_q_lens=jnp.asarray([0, len(chunk)], jnp.int32), num_seqs=jnp.asarray(1, jnp.int32))
        chunk_logits, kv = step(loaded.graphdef, attention_impl, loaded.params, kv, jnp.asarray(chunk, jnp.int32),
                                jnp.asarray(positions), meta)
        out.append(np.asarray(chunk_logits))
        start += len(chunk)
    return np.concatenate(out)
