"""Offline generation throughput: jaxserve's generate loop vs HF transformers' batched generate.

    python benchmarks/generate.py --model smollm2-135m --batch 8 --input-len 128 --output-len 64 --json out.json

Random prompt ids, greedy, EOS ignored, same prompts for both. jaxserve is warmed up first (compile
time is reported separately); HF runs in float32 on PyTorch CPU. Needs the test extras (torch, transformers).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def time_jaxserve(model: str, prompts: list[list[int]], output_len: int) -> dict:
    from jaxserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, progress=False)
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(prompts, params)  # compiles the prefill and decode buckets
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    return {"system": "jaxserve", "seconds": seconds, "load_s": load_s, "warmup_s": warmup_s,
            "output_tokens": sum(len(o.token_ids) for o in outs)}


def time_transformers(gguf_path, prompts: list[list[int]], output_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        seconds = time.perf_counter() - t0
    return {"system": "transformers", "seconds": seconds, "output_tokens": int((out.shape[1] - ids.shape[1]) * ids.shape[0])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from jaxserve.checkpoint.registry import fetch_gguf

    rng = np.random.default_rng(0)
    prompts = rng.integers(100, 49000, (args.batch, args.input_len)).tolist()
    rows = [time_jaxserve(args.model, prompts, args.output_len),
            time_transformers(fetch_gguf(args.model), prompts, args.output_len)]
    for r in rows:
        r["output_tok_s"] = r["output_tokens"] / r["seconds"]
    base = rows[1]["output_tok_s"]
    print(f"{'system':<14}{'batch':>6}{'in':>6}{'out':>6}{'seconds':>10}{'out tok/s':>11}{'vs HF':>7}")
    for r in rows:
        print(f"{r['system']:<14}{args.batch:>6}{args.input_len:>6}{args.output_len:>6}"
              f"{r['seconds']:>10.2f}{r['output_tok_s']:>11.1f}{r['output_tok_s'] / base:>7.2f}")
    if args.json:
        meta = {"args": vars(args), "machine": platform.processor() or platform.machine(),
                "date": time.strftime("%Y-%m-%d")}
        with open(args.json, "w") as f:
            json.dump({**meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
