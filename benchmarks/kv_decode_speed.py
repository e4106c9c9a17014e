"""CPU decode speed of the XLA attention path per KV cache dtype, on long contexts.

    python benchmarks/kv_decode_speed.py --model smollm2-135m --num-requests 16 --input-len 2000 \
        --output-len 64 --json benchmarks/kv_decode_speed.json

One engine per dtype on the same random prompts (EOS ignored, all queued at once). Decode
throughput counts the tokens generated once every prompt is prefilled, over that phase's time, so
it measures attention over ~2,000 cached tokens per sequence rather than prefill. The first dtype
(`auto`: the model dtype) is the baseline of the ratio column.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from throughput import run_engine

DTYPES = ("auto", "bfloat16", "fp8", "int8", "int4", "nvfp4")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=2000)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from jaxserve.checkpoint import load_model
    from jaxserve.engine.engine import Engine, EngineConfig

    model = load_model(args.model, progress=False)
    prompts = np.random.default_rng(0).integers(100, 49000, (args.num_requests, args.input_len)).tolist()
    rows = []
    for dtype in args.dtypes:
        engine = Engine(model, EngineConfig(kv_cache_dtype=dtype, max_num_seqs=args.num_requests,
                                            enable_prefix_caching=False))
        run_engine(engine, [p[:40] for p in prompts[:2]], 4)  # touch every path once
        r = run_engine(engine, prompts, args.output_len)
        rows.append({"kv_cache_dtype": dtype, **r})
    base = rows[0]["decode_throughput"]
    print(f"{args.num_requests} requests x {args.input_len} in / {args.output_len} out, XLA attention path")
    print(f"{'kv dtype':10}{'decode tok/s':>13}{'vs ' + args.dtypes[0]:>9}{'TPOT ms':>9}{'total tok/s':>12}")
    for r in rows:
        r["decode_vs_base"] = r["decode_throughput"] / base
        print(f"{r['kv_cache_dtype']:10}{r['decode_throughput']:13.1f}{r['decode_vs_base']:9.2f}"
              f"{r['mean_tpot_ms']:9.1f}{r['total_token_throughput']:12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
                       "rows": rows}, f, indent=1, default=float)


if __name__ == "__main__":
    main()
