"""CPU decode speed of the XLA attention path per KV cache dtype, on long contexts.

    python benchmarks/kv_decode_speed.py --model smollm2-135m --num-requests 8 --input-len 2000 \
        --output-len 64 --rounds 3 --json benchmarks/kv_decode_speed.json

One engine per dtype, all kept alive, on the same random prompts (EOS ignored, all queued at
once). Decode throughput counts the tokens generated once every prompt is prefilled, over that
phase's time, so it measures attention over ~2,000 cached tokens per sequence rather than prefill.
This machine's speed drifts by +-15% between minutes, so the dtypes take turns: each round runs
every engine once, and a dtype's ratio to the first dtype (`auto`: the model dtype) is taken within
a round and reported as the median over rounds. Prefix caching keeps the prompts' pages after the
first round, so later rounds spend their time on the decode phase (which reads the same pages).
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
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=2000)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from jaxserve.checkpoint import load_model
    from jaxserve.engine import Engine, EngineConfig

    model = load_model(args.model, progress=False)
    prompts = np.random.default_rng(0).integers(100, 49000, (args.num_requests, args.input_len)).tolist()
    engines = {}
    for dtype in args.dtypes:
        engines[dtype] = Engine(model, EngineConfig(kv_cache_dtype=dtype, max_num_seqs=args.num_requests))
        run_engine(engines[dtype], [p[:40] for p in prompts[:2]], 4)  # touch every path once
    runs = {dtype: [] for dtype in args.dtypes}  # per round
    for i in range(args.rounds):
        for dtype, engine in engines.items():
            runs[dtype].append(run_engine(engine, prompts, args.output_len))
            print(f"round {i + 1}/{args.rounds} {dtype:9} decode {runs[dtype][-1]['decode_throughput']:6.1f} tok/s",
                  flush=True)
    rows = [_summary(dtype, runs[dtype], runs[args.dtypes[0]]) for dtype in args.dtypes]
    print(f"\n{args.num_requests} requests x {args.input_len} in / {args.output_len} out, XLA attention path, "
          f"{args.rounds} rounds")
    print(f"{'kv dtype':10}{'decode tok/s':>13}{'vs ' + args.dtypes[0]:>9}{'per round':>22}{'TPOT ms':>9}")
    for r in rows:
        rounds = " ".join(f"{x:.2f}" for x in r["decode_vs_base_rounds"])
        print(f"{r['kv_cache_dtype']:10}{r['decode_throughput']:13.1f}{r['decode_vs_base']:9.2f}{rounds:>22}"
              f"{r['mean_tpot_ms']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
                       "rows": rows}, f, indent=1, default=float)


def _summary(dtype: str, runs: list[dict], base_runs: list[dict]) -> dict:
    """Medians over rounds; the ratio is taken within each round (same minute of machine speed)."""
    decode = [r["decode_throughput"] for r in runs]
    ratios = [r["decode_throughput"] / b["decode_throughput"] for r, b in zip(runs, base_runs)]
    return {"kv_cache_dtype": dtype, "decode_throughput": float(np.median(decode)),
            "decode_vs_base": float(np.median(ratios)), "decode_vs_base_rounds": ratios,
            "decode_throughput_rounds": decode, "mean_tpot_ms": float(np.median([r["mean_tpot_ms"] for r in runs])),
            "first_round": runs[0]}


if __name__ == "__main__":
    main()
