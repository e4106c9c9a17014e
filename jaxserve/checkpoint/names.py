"""The one table mapping our parameter names to HF and GGUF tensor names, and the assembler that
stacks per-layer tensors into each layer group's [layers, ...] arrays, collecting every mismatch at once."""
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
TOP_TENSORS = {
    "embed": TensorName("model.embed_tokens.weight", "token_embd.weight", False),
    "final_norm": TensorName("model.norm.weight", "output_norm.weight", False),
    "lm_head": TensorName("lm_head.weight", "output.weight", True),
}
# Tensors a checkpoint may carry that the model derives itself.
IGNORED = {"rotary_emb.inv_freq", "rope_freqs.weight"}


def name_index(cfg: ModelConfig, fmt: str) -> dict[str, tuple[str, int | None]]:
    """{checkpoint tensor name: (our name, global layer index or None)} for fmt in {"hf", "gguf"}."""
    specs = param_specs(cfg)
    groups = cfg.layer_groups
    index = {getattr(TOP_TENSORS[n], fmt): (n, None) for n in specs if n not in {g.name for g in groups}}
    for g in groups:
        for n in specs[g.name]:
            template = getattr(LAYER_TENSORS[n], fmt)
            index.update({template.format(i=i): (n, i) for i in g.layers})
    return index


def numpy_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


class ParamAssembler:
    """Fills the model's parameter arrays tensor by tensor, then reports all problems together.
    Per-layer tensors are stacked into their layer group's arrays ([group layers, ...])."""

    def __init__(self, cfg: ModelConfig, dtype, source: str):
        self.cfg, self.source = cfg, source
        self.specs = param_specs(cfg)
        self.groups = cfg.layer_groups
        np_dtype = numpy_dtype(dtype)
        group_names = {g.name for g in self.groups}
        self.params = {n: np.empty(s.shape, np_dtype) for n, s in self.specs.items() if n not in group_names}
        for g in self.groups:
            self.params[g.name] = {n: np.empty(s.shape, np_dtype) for n, s in self.specs[g.name].items()}
        self.seen: set[tuple[str, int | None]] = set()
        self.problems: list[str] = []

    def _target(self, name: str, layer: int | None) -> np.ndarray | None:
        if layer is None:
            return self.params[name]
        for g in self.groups:
            if layer in g.layers and name in self.params[g.name]:
                return self.params[g.name][name][layer - g.start]
        return None

    def put(self, name: str, layer: int | None, array: np.ndarray, transpose: bool):
        if transpose:
            array = array.T
        where = f"{name}[{layer}]" if layer is not None else name
        target = self._target(name, layer)
        if target is None:
            self.problems.append(f"{where} is not a parameter of this model")
            return
        if array.shape != target.shape:
            self.problems.append(f"{where} has shape {array.shape}, expected {target.shape}")
            return
        target[...] = array
        self.seen.add((name, layer))

    def finish(self) -> dict:
        group_names = {g.name for g in self.groups}
        missing = [n for n in self.specs if n not in group_names and (n, None) not in self.seen]
        for g in self.groups:
            for n in self.specs[g.name]:
                absent = [i for i in g.layers if (n, i) not in self.seen]
                if absent:
                    missing.append(f"{n} (layers {absent[0]}..{absent[-1]})" if len(absent) > 1 else f"{n}[{absent[0]}]")
        if missing:
            self.problems.append("missing " + ", ".join(missing))
        if self.problems:
            shown = "; ".join(self.problems[:6]) + (f"; and {len(self.problems) - 6} more" if len(self.problems) > 6 else "")
            raise CheckpointError(f"{self.source} does not match its config: {shown}")
        return self.params
