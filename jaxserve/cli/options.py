"""What several commands share: sampling and engine options, sizes, the compilation cache.
Imports nothing heavy: option names come from modules that need no jax."""
from __future__ import annotations

import argparse
import os

from jaxserve.ops.backends import ATTENTION_BACKENDS
from pallas_kernels.kv_formats import KV_CACHE_DTYPES

DEFAULT_MODEL_HELP = "a known name (smollm2-135m) or a checkpoint path (HF safetensors dir, .gguf, jaxserve orbax dir)"


def add_sampling_options(p):
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept, in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def sampling_options(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def add_engine_options(p):
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight dtype (auto: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="format of the KV pages (auto: the model dtype)")
    p.add_argument("--kv-cache-memory", type=size, default=None,
                   help="bytes for KV pages per device, e.g. 2G (default 1G)")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="auto: the platform's Pallas kernel on TPU/GPU, the native C++ decode kernel "
                        "(else XLA) on CPU")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step (prefill chunk)")
    p.add_argument("--moe-min-router-weight", type=float, default=0.0,
                   help="MoE models: skip a chosen expert whose renormalized router weight is below this "
                        "(0: off; the top expert always runs)")
    p.add_argument("--moe-top-p", type=float, default=1.0,
                   help="MoE models: run the fewest chosen experts holding this share of router weight (1: off)")
    p.add_argument("--kv-transfer-dtype", default="auto", choices=["auto", "int8"],
                   help="disaggregated serving: KV pages on the wire (auto: as stored, exact; int8: float pages "
                        "as int8 with a scale per vector, ~3.8x fewer bytes for float32)")
    p.add_argument("--kv-transfer-timeout", type=float, default=30.0,
                   help="disaggregated serving: seconds a decode engine waits for a request's KV pages before "
                        "prefilling it itself")


def engine_options(args) -> dict:
    return dict(kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=args.kv_cache_memory,
                attention_backend=args.attention_backend, max_num_batched_tokens=args.max_num_batched_tokens,
                moe_min_router_weight=args.moe_min_router_weight, moe_top_p=args.moe_top_p,
                kv_transfer_dtype=args.kv_transfer_dtype, kv_transfer_timeout=args.kv_transfer_timeout)


def size(text: str) -> int:
    """"512M", "2G", "1.5GiB" or a byte count -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G or bytes)") from None


def enable_compilation_cache():
    """Reuse compiled step functions across runs (start-up compiles every shape bucket)."""
    import jax

    from jaxserve.checkpoint.registry import cache_dir

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
