"""Quantized KV caches: quality and capacity per kv_cache_dtype, against `auto` (the model dtype).

    python benchmarks/kv_cache_quality.py --model smollm2-135m --json benchmarks/kv_cache_quality.json

Per dtype, in one run: perplexity of benchmarks/data/alice_ch1-3.txt (Lewis Carroll, "Alice's
Adventures in Wonderland", chapters I-III, Project Gutenberg eBook #11, public domain; 8,457
SmolLM2 tokens) scored through the engine's paged cache in windows of --ctx tokens prefilled in
chunks of the token budget; greedy-token agreement with `auto` on 8 prompts x 64 tokens (share of
positions where the tokens are equal, and how many of the 8 continuations are identical); and the
cached tokens the engine reports for the same --kv-cache-memory, against bfloat16.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

PROMPTS = json.loads((pathlib.Path(__file__).parent / "data" / "prompts.json").read_text())  # as tests/test_smollm2.py
TEXT = pathlib.Path(__file__).parent / "data" / "alice_ch1-3.txt"
DTYPES = ("auto", "bfloat16", "fp8", "int8", "int4", "nvfp4")


def measure(model, dtype: str, ids, ctx: int, memory: int, budget: int) -> dict:
    from jaxserve import LLM, SamplingParams
    from jaxserve.perplexity import perplexity

    llm = LLM(model, progress=False, kv_cache_dtype=dtype, kv_cache_memory=memory, max_num_batched_tokens=budget)
    start = time.perf_counter()
    ppl = perplexity(llm.engine, ids, ctx, progress=False)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    print(f"{dtype}: perplexity {ppl.perplexity:.4f} in {seconds:.0f} s, greedy in {time.perf_counter() - start:.0f} s",
          flush=True)
    return {"kv_cache_dtype": dtype, "format": llm.engine.info().kv_cache_dtype, "perplexity": ppl.perplexity,
            "scored_tokens": ppl.tokens, "seconds": seconds, "cached_tokens": llm.engine.info().max_cached_tokens,
            "greedy": [o.token_ids for o in outs]}


def agreement(a, b) -> tuple[float, int]:
    same = sum(x == y for ta, tb in zip(a, b) for x, y in zip(ta, tb))
    return same / sum(map(len, a)), sum(ta == tb for ta, tb in zip(a, b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from jaxserve.checkpoint import load_model

    model = load_model(args.model, progress=False)
    ids = model.tokenizer.encode(TEXT.read_text())
    rows = {}
    for d in args.dtypes:
        rows[d] = measure(model, d, ids, args.ctx, args.kv_cache_memory, args.max_num_batched_tokens)
    base, bf16 = rows[args.dtypes[0]], rows.get("bfloat16")
    print(f"{len(ids)} tokens of {TEXT.name}, windows of {args.ctx}, {args.kv_cache_memory / 2**30:.2f} GiB KV")
    print(f"{'kv dtype':10} {'ppl':>8} {'vs base':>8} {'greedy agree':>12} {'same of 8':>9} "
          f"{'cached tok':>10} {'vs bf16':>7} {'ppl s':>6}")
    for r in rows.values():
        r["ppl_increase"] = r["perplexity"] / base["perplexity"] - 1
        r["greedy_agreement"], r["identical_continuations"] = agreement(base["greedy"], r["greedy"])
        r["capacity_vs_bfloat16"] = r["cached_tokens"] / bf16["cached_tokens"] if bf16 else None
        cap = f"{r['capacity_vs_bfloat16']:.3f}x" if bf16 else "-"
        print(f"{r['kv_cache_dtype']:10} {r['perplexity']:8.4f} {r['ppl_increase']:+8.2%} "
              f"{r['greedy_agreement']:12.1%} {r['identical_continuations']:9d} {r['cached_tokens']:10d} "
              f"{cap:>7} {r['seconds']:6.1f}")
    if args.json:
        meta = {"model": args.model, "text": TEXT.name, "text_tokens": len(ids), "ctx": args.ctx,
                "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=1))


if __name__ == "__main__":
    main()
