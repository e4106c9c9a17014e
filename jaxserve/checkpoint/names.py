"""The one table mapping our parameter names to HF and GGUF tensor names, and the assembler that
stacks per-layer (and, for MoE, per-expert) tensors into each layer group's [layers, ...] arrays,
collecting every mismatch at once."""
from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError
from jaxserve.models import param_specs


class TensorName(NamedTuple):
    hf: str
    gguf: str
    transpose: bool  # HF and GGUF store matrices [out, in]; we store [in, out]


LAYER_TENSORS = {
    "attn_norm": TensorName("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", False),
    "wq": TensorName("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", True),
    "wk": TensorName("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", True),
    "wv": TensorName("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", True),
    "wo": TensorName("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", True),
    "bq": TensorName("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", False),
    "bk": TensorName("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", False),
    "bv": TensorName("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", False),
    "bo": TensorName("model.layers.{i}.self_attn.o_proj.bias", "blk.{i}.attn_output.bias", False),
    "q_norm": TensorName("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", False),
    "k_norm": TensorName("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", False),
    "mlp_norm": TensorName("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", False),
    "w_gate": TensorName("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", True),
    "w_up": TensorName("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", True),
    "w_down": TensorName("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", True),
}
# MoE FFN tensors. HF checkpoints hold one tensor per expert ({j}); GGUF holds them stacked
# [experts, out, in]. HF names differ by family: Mixtral's block_sparse_moe, Qwen's mlp.
_MIXTRAL = "model.layers.{i}.block_sparse_moe"
_QWEN = "model.layers.{i}.mlp"
MOE_TENSORS = {
    "router": ({"mixtral": f"{_MIXTRAL}.gate.weight", "qwen": f"{_QWEN}.gate.weight"}, "blk.{i}.ffn_gate_inp.weight"),
    "we_gate": ({"mixtral": f"{_MIXTRAL}.experts.{{j}}.w1.weight", "qwen": f"{_QWEN}.experts.{{j}}.gate_proj.weight"},
                "blk.{i}.ffn_gate_exps.weight"),
    "we_up": ({"mixtral": f"{_MIXTRAL}.experts.{{j}}.w3.weight", "qwen": f"{_QWEN}.experts.{{j}}.up_proj.weight"},
              "blk.{i}.ffn_up_exps.weight"),
    "we_down": ({"mixtral": f"{_MIXTRAL}.experts.{{j}}.w2.weight", "qwen": f"{_QWEN}.experts.{{j}}.down_proj.weight"},
                "blk.{i}.ffn_down_exps.weight"),
    "ws_gate": ({"qwen": f"{_QWEN}.shared_expert.gate_proj.weight"}, "blk.{i}.ffn_gate_shexp.weight"),
    "ws_up": ({"qwen": f"{_QWEN}.shared_expert.up_proj.weight"}, "blk.{i}.ffn_up_shexp.weight"),
    "ws_down": ({"qwen": f"{_QWEN}.shared_expert.down_proj.weight"}, "blk.{i}.ffn_down_shexp.weight"),
    "ws_router": ({"qwen": f"{_QWEN}.shared_expert_gate.weight"}, "blk.{i}.ffn_gate_inp_shexp.weight"),
}
PER_EXPERT = ("we_gate", "we_up", "we_down")  # stacked [experts, ...] in our params
TOP_TENSORS = {
    "embed": TensorName("model.embed_tokens.weight", "token_embd.weight", False),
    "final_norm": TensorName("model.norm.weight", "output_norm.weight", False),
    "lm_head": TensorName("lm_head.weight", "output.weight", True),
}
# Tensors a checkpoint may carry that the model derives itself.
IGNORED = {"rotary_emb.inv_freq", "rope_freqs.weight"}


def transposed(name: str) -> bool:
    """Whether the checkpoint holds our parameter `name` as [..., out, in] (every MoE matrix does)."""
    return name in MOE_TENSORS or {**TOP_TENSORS, **LAYER_TENSORS}[name].transpose


def _layer_names(cfg: ModelConfig, name: str, fmt: str, layer: int):
    """(checkpoint name, expert or None) of our parameter `name` in `layer`."""
    if name in LAYER_TENSORS:
        yield getattr(LAYER_TENSORS[name], fmt).format(i=layer), None
        return
    hf, gguf = MOE_TENSORS[name]
    template = gguf if fmt == "gguf" else hf["mixtral" if cfg.architecture == "mixtral" else "qwen"]
    if fmt == "gguf" or name not in PER_EXPERT:
        yield template.format(i=layer), None
        return
    for j in range(cfg.num_experts):
        yield template.format(i=layer, j=j), j


def name_index(cfg: ModelConfig, fmt: str) -> dict[str, tuple[str, int | None, int | None]]:
    """{checkpoint tensor name: (our name, global layer or None, expert or None)} for fmt in
    {"hf", "gguf"}; the expert is set for HF's per-expert tensors."""
    specs = param_specs(cfg)
    groups = cfg.layer_groups
    index = {getattr(TOP_TENSORS[n], fmt): (n, None, None) for n in specs if n not in {g.name for g in groups}}
    for g in groups:
        for n in specs[g.name]:
            for i in g.layers:
                index.update({ckpt: (n, i, j) for ckpt, j in _layer_names(cfg, n, fmt, i)})
    return index


def numpy_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


class ParamAssembler:
    """Fills the model's parameter arrays tensor by tensor, then reports all problems together.
    Per-layer tensors are stacked into their layer group's arrays ([group layers, ...])."""

    def __init__(self, cfg: ModelConfig, dtype, source: str, index: dict | None = None):
        self.cfg, self.source = cfg, source
        # (our name, layer, expert) -> checkpoint name, to name a missing expert tensor as stored
        self.stored_names = {v: k for k, v in (index or {}).items()}
        self.specs = param_specs(cfg)
        self.groups = cfg.layer_groups
        np_dtype = numpy_dtype(dtype)
        group_names = {g.name for g in self.groups}
        self.params = {n: np.empty(s.shape, np_dtype) for n, s in self.specs.items() if n not in group_names}
        for g in self.groups:
            self.params[g.name] = {n: np.empty(s.shape, np_dtype) for n, s in self.specs[g.name].items()}
        self.seen: set[tuple[str, int | None, int | None]] = set()  # expert None: the whole tensor
        self.problems: list[str] = []

    def _target(self, name: str, layer: int | None) -> np.ndarray | None:
        if layer is None:
            return self.params[name]
        for g in self.groups:
            if layer in g.layers and name in self.params[g.name]:
                return self.params[g.name][name][layer - g.start]
        return None

    def put(self, name: str, layer: int | None, array: np.ndarray, transpose: bool, expert: int | None = None):
        """Stores a checkpoint tensor ([..., out, in] if `transpose`) as our parameter `name` of
        `layer` (and `expert`, for one expert's tensor of a stacked parameter)."""
        if transpose and array.ndim >= 2:
            array = np.swapaxes(array, -1, -2)
        where = name if layer is None else f"{name}[{layer}]" if expert is None else f"{name}[{layer}][expert {expert}]"
        target = self._target(name, layer)
        if target is not None and expert is not None:
            target = target[expert]
        if target is None:
            self.problems.append(f"{where} is not a parameter of this model")
            return
        if name == "ws_router" and array.size == target.size:
            array = array.reshape(target.shape)  # the shared expert's gate, stored [D] (GGUF) or [1, D]
        if array.shape != target.shape:
            self.problems.append(f"{where} has shape {array.shape}, expected {target.shape}")
            return
        target[...] = array
        self.seen.add((name, layer, expert))

    def _absent_experts(self, name: str, layer: int) -> list[str]:
        """Checkpoint names of the experts of a stacked parameter that were never stored."""
        if (name, layer, None) in self.seen or name not in PER_EXPERT:
            return []
        experts = [j for j in range(self.cfg.num_experts) if (name, layer, j) not in self.seen]
        if len(experts) == self.cfg.num_experts:
            return []  # the whole tensor is absent: reported per layer
        return [self.stored_names.get((name, layer, j), f"{name}[{layer}][expert {j}]") for j in experts]

    def _stored(self, name: str, layer: int) -> bool:
        return (name, layer, None) in self.seen or any((name, layer, j) in self.seen
                                                       for j in range(self.cfg.num_experts))

    def finish(self) -> dict:
        group_names = {g.name for g in self.groups}
        missing = [n for n in self.specs if n not in group_names and (n, None, None) not in self.seen]
        for g in self.groups:
            for n in self.specs[g.name]:
                for i in g.layers:
                    missing += self._absent_experts(n, i)
                absent = [i for i in g.layers if not self._stored(n, i)]
                if absent:
                    missing.append(f"{n} (layers {absent[0]}..{absent[-1]})" if len(absent) > 1 else f"{n}[{absent[0]}]")
        if missing:
            self.problems.append("missing " + ", ".join(missing))
        if self.problems:
            shown = "; ".join(self.problems[:6]) + (f"; and {len(self.problems) - 6} more" if len(self.problems) > 6 else "")
            raise CheckpointError(f"{self.source} does not match its config: {shown}")
        return self.params
