"""Frozen model configuration, built from an HF config.json (GGUF metadata: checkpoint/gguf_io.py)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxserve.errors import CheckpointError, UnsupportedModelError

# HF `model_type` values whose decoder this core implements.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")


def check_router_options(moe_min_router_weight: float, moe_top_p: float) -> None:
    """The dynamic expert skipping options' ranges (ModelConfig; EngineConfig checks them early)."""
    if not 0.0 <= moe_min_router_weight < 1.0:
        raise ValueError(f"moe_min_router_weight must be in [0, 1), got {moe_min_router_weight}")
    if not 0.0 < moe_top_p <= 1.0:
        raise ValueError(f"moe_top_p must be in (0, 1], got {moe_top_p}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: "linear" (position interpolation) or "llama3" (wavelength bands)."""
    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Consecutive decoder layers of one kind: their weights are stacked on a leading axis and run
    under one scan. A model is a sequence of groups, so layers of different kinds (dense and MoE
    FFNs) can mix; a dense model is one group."""
    name: str    # the key of its stacked parameters ("layers" for the first group)
    kind: str    # which FFN the layers have: "dense" (SwiGLU) or "moe" (routed experts)
    start: int   # global index of its first layer (KV pages are indexed by global layer)
    count: int

    @property
    def layers(self) -> range:
        return range(self.start, self.start + self.count)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors of the RoPE inverse frequencies (llama.cpp's rope_freqs tensor).
    rope_freq_factors: tuple[float, ...] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False          # Qwen2; Llama with attention_bias
    o_bias: bool = False            # Llama with attention_bias
    qk_norm: bool = False           # Qwen3: RMSNorm over each head of q and k
    sliding_window: int | None = None
    # Mixture of experts (0 experts: every layer is dense). See jaxserve/ops/moe.py.
    num_experts: int = 0
    num_experts_per_token: int = 0
    moe_intermediate_size: int = 0              # each routed expert's FFN width
    shared_expert_intermediate_size: int = 0    # Qwen2-MoE's sigmoid-gated shared expert (0: none)
    norm_topk_prob: bool = True                 # renormalize the chosen experts' weights to sum to 1
    dense_layers: tuple[int, ...] = ()          # layers with a dense FFN in an MoE model
    # Opt-in dynamic expert skipping (off: the plain top-k router, bit for bit). Per token, a chosen
    # expert is dropped when its weight (renormalized over the chosen k) is below
    # moe_min_router_weight, or when the experts before it already hold moe_top_p of the weight;
    # the first expert is always kept and the kept weights are rescaled to the original total.
    moe_min_router_weight: float = 0.0
    moe_top_p: float = 1.0

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; jaxserve supports "
                + ", ".join(SUPPORTED_ARCHITECTURES))
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.num_experts:
            self._check_moe()

    def _check_moe(self):
        if not 1 <= self.num_experts_per_token <= self.num_experts:
            raise CheckpointError(f"num_experts_per_tok={self.num_experts_per_token} must be between 1 and "
                                  f"num_experts={self.num_experts}")
        if self.moe_intermediate_size < 1:
            raise CheckpointError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
        check_router_options(self.moe_min_router_weight, self.moe_top_p)
        outside = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if outside:
            raise CheckpointError(f"dense layer {outside[0]} is outside the model's {self.num_layers} layers")

    @property
    def skips_experts(self) -> bool:
        """Whether the router drops some chosen experts (dynamic expert skipping is on)."""
        return self.moe_min_router_weight > 0.0 or self.moe_top_p < 1.0

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def layer_kind(self, layer: int) -> str:
        return "moe" if self.num_experts and layer not in self.dense_layers else "dense"

    @property
    def layer_groups(self) -> tuple[LayerGroup, ...]:
        """The model's layers as runs of one kind each, in order (see LayerGroup). The first group's
        parameters are "layers"; a later one's "layers_<first layer>"."""
        groups, start = [], 0
        for i in range(1, self.num_layers + 1):
            if i == self.num_layers or self.layer_kind(i) != self.layer_kind(start):
                name = "layers" if start == 0 else f"layers_{start}"
                groups.append(LayerGroup(name, self.layer_kind(start), start, i - start))
                start = i
        return tuple(groups)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        d = json.loads(text)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        for key in ("rope_freq_factors", "dense_layers"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """Reads rope theta and scaling from either transformers 4 (`rope_theta`, `rope_scaling`)
    or transformers 5 (`rope_parameters`) config layouts."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    raise UnsupportedModelError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


def _sliding_window_from_hf(hf: dict, arch: str) -> int | None:
    if arch.startswith("qwen"):
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{arch} with use_sliding_window=true is not supported")
        return None
    return hf.get("sliding_window")


def _moe_from_hf(hf: dict, arch: str) -> dict:
    """The MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config.json (KeyError names a missing field)."""
    if arch == "mixtral":  # every layer routed; the experts' width is intermediate_size
        return dict(num_experts=int(hf["num_local_experts"]), num_experts_per_token=int(hf["num_experts_per_tok"]),
                    moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True)
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if experts is None:
        raise KeyError("num_experts")
    step = int(hf.get("decoder_sparse_step") or 1)
    only_mlp = set(hf.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(int(hf["num_hidden_layers"])) if i in only_mlp or (i + 1) % step)
    return dict(num_experts=int(experts), num_experts_per_token=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0)
                if arch == "qwen2_moe" else 0,
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dense_layers=dense)


def from_hf_config(hf: dict) -> ModelConfig:
    """Converts a parsed HF config.json into a ModelConfig."""
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r} (model_type in config.json); jaxserve supports "
            + ", ".join(SUPPORTED_ARCHITECTURES))
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act={hf['hidden_act']!r} is not supported (silu only)")
    try:
        theta, scaling = _rope_from_hf(hf)
        heads = int(hf["num_attention_heads"])
        attention_bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=(arch == "qwen2" or attention_bias or (arch == "qwen2_moe" and hf.get("qkv_bias", True))),
            o_bias=arch not in ("qwen2", "qwen2_moe") and attention_bias,
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            sliding_window=_sliding_window_from_hf(hf, arch),
            **(_moe_from_hf(hf, arch) if arch in MOE_ARCHITECTURES else {}),
        )
    except KeyError as e:
        raise CheckpointError(f"config.json is missing the field {e.args[0]!r}") from None


def load_hf_config(path: Path) -> ModelConfig:
    try:
        hf = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    return from_hf_config(hf)
