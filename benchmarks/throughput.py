"""Offline throughput of the paged engine, against HF transformers and the matmul-only ceiling.

    python benchmarks/throughput.py --model smollm2-135m --num-requests 64 --input-len 128 \
        --output-len 128 --json out.json

Random prompt ids, EOS ignored, all requests queued at once (as `vllm bench throughput`). In the
same run: HF transformers' batched `generate` on the same prompts (PyTorch CPU, by default in the
engine's weight dtype; `--hf-dtypes float32,bfloat16` times both), and the
model's weight matmuls alone for the same schedule of batches (the compute ceiling of the machine),
the roofline (the workload's weight-matmul FLOPs at the best dense GEMM rate measured on this machine,
which bounds every implementation, HF's included), plus time-to-first-token of a request sharing a long
prefix with an earlier one (prefix caching).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

GEMM_SIZE = 2048  # square matmul that measures the machine's best GEMM rate (~17 GFLOP)


def fastest_cpu_dtype() -> str:
    """bfloat16 where the CPU has bfloat16 dot instructions, else float32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def run_engine(engine, prompts, output_len: int) -> dict:
    from jaxserve import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first, last, steps, prefill_steps = {}, {}, 0, 0
    decode_start, decode_tokens = None, 0  # the pure-decode phase: every prompt prefilled
    while engine.has_unfinished():
        deltas = engine.step()
        now = time.perf_counter()
        steps += 1
        if decode_start is not None:
            decode_tokens += sum(len(d.new_token_ids) for d in deltas)
        for d in deltas:
            first.setdefault(d.request_id, now)
            last[d.request_id] = now
        prefill_steps += len(first) < len(ids)
        if decode_start is None and len(first) == len(ids):
            decode_start = now
    elapsed = time.perf_counter() - start
    ttft = np.array([first[i] - start for i in ids]) * 1e3
    tpot = np.array([(last[i] - first[i]) / max(output_len - 1, 1) for i in ids]) * 1e3
    n_in, n_out = sum(map(len, prompts)), len(prompts) * output_len
    return {"elapsed_s": elapsed, "steps": steps, "output_throughput": n_out / elapsed,
            "total_token_throughput": (n_in + n_out) / elapsed,
            "mean_ttft_ms": ttft.mean(), "p99_ttft_ms": np.percentile(ttft, 99),
            "mean_tpot_ms": tpot.mean(), "p99_tpot_ms": np.percentile(tpot, 99),
            "decode_throughput": decode_tokens / max(time.perf_counter() - decode_start, 1e-9) if decode_tokens else 0.0}


def matmul_only_seconds(model, num_requests: int, input_len: int, output_len: int, budget: int,
                        max_num_seqs: int) -> float:
    """Time of the model's weight matmuls alone for the engine's schedule: prefill in chunks of the
    token budget, then one decode batch per output token. Same params, dtype and layer scan."""
    import jax
    import jax.numpy as jnp

    from jaxserve.models.layers import dense, dense_transposed, swiglu, weight

    params = model.params
    layers = {k: params["layers"][k][...] for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
    embed = params["embed"][...]

    @jax.jit
    def matmuls(x, layers, embed):
        def body(h, p):
            p = {k: weight(w) for k, w in p.items()}  # as the model reads its stored weights
            kv = dense(h, p["wk"]) + dense(h, p["wv"])  # padded into the residual: reducing it would fuse the dots away
            o = dense(dense(h, p["wq"]), p["wo"]) + jnp.pad(kv, ((0, 0), (0, h.shape[1] - kv.shape[1])))
            # tanh keeps activations finite: inf/NaN arithmetic would make the "ceiling" slow
            return jnp.tanh(h + o + swiglu(h, p["w_gate"], p["w_up"], p["w_down"])), None
        h, _ = jax.lax.scan(body, x, layers)
        return dense_transposed(h[:max_num_seqs], embed)

    def time_batch(tokens: int) -> float:
        x = 0.1 * jax.random.normal(jax.random.key(0), (tokens, embed.shape[1]), jnp.float32)
        matmuls(x, layers, embed).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(5):
            matmuls(x, layers, embed).block_until_ready()
        return (time.perf_counter() - t0) / 5

    total_prefill = num_requests * input_len
    decode_batches = output_len * -(-num_requests // max_num_seqs)
    return (total_prefill // budget) * time_batch(budget) + time_batch(min(num_requests, max_num_seqs)) * decode_batches


def weight_matmul_flops(cfg, num_requests: int, input_len: int, output_len: int) -> float:
    """FLOPs of the workload's weight matmuls: each request runs its prompt and all but its last output
    token through every layer's projections, and the LM head once per output token."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer_macs = cfg.num_layers * (cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size)
    head_macs = cfg.hidden_size * cfg.vocab_size
    return 2.0 * num_requests * ((input_len + output_len - 1) * layer_macs + output_len * head_macs)


def dense_gemm_peak(dtype: str, n: int = GEMM_SIZE) -> dict:
    """Best rate (FLOP/s) of a large square matmul in the weights' dtype (float32 sums), by XLA and, when
    installed, by PyTorch (HF's backend): what this machine's matmuls can reach at best."""
    import jax
    import jax.numpy as jnp

    from jaxserve.models.layers import dense

    def best_rate(run) -> float:
        run()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return 2.0 * n ** 3 / min(times)

    a = jnp.ones((n, n), jnp.float32)
    b = jnp.ones((n, n), dtype)
    matmul = jax.jit(dense)
    peaks = {"xla": best_rate(lambda: matmul(a, b).block_until_ready())}
    try:
        import torch
    except ImportError:
        return peaks
    ta, tb = torch.ones(n, n, dtype=getattr(torch, dtype)), torch.ones(n, n, dtype=getattr(torch, dtype))
    peaks["torch"] = best_rate(lambda: torch.matmul(ta, tb))
    return peaks


def run_transformers(gguf_path, prompts, output_len: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding
    with torch.no_grad():
        model.generate(ids[:2, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - t0
    n_in, n_out = ids.numel(), len(prompts) * output_len
    return {"elapsed_s": elapsed, "output_throughput": n_out / elapsed, "total_token_throughput": (n_in + n_out) / elapsed}


def prefix_cache_ttft(engine, prefix_len: int, rng) -> dict:
    """TTFT of a cold request with a long prefix, then of another sharing that prefix."""
    from jaxserve import SamplingParams

    prefix = rng.integers(100, 49000, prefix_len).tolist()
    times = []
    for suffix in ([11, 12, 13], [21, 22, 23]):
        t0 = time.perf_counter()
        rid = engine.add_request(prefix + suffix, SamplingParams(max_tokens=1, temperature=0))
        cached = 0
        while engine.has_unfinished():
            for d in engine.step():
                cached = d.usage.cached_prompt_tokens if d.request_id == rid else cached
        times.append((time.perf_counter() - t0, cached))
    (cold, _), (warm, cached) = times
    return {"prefix_len": prefix_len, "cold_ttft_ms": cold * 1e3, "cached_ttft_ms": warm * 1e3,
            "speedup": cold / warm, "cached_prompt_tokens": cached}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="fastest", choices=["fastest", "auto", "float32", "bfloat16"],
                    help="weights (activations stay float32). fastest: bfloat16 on CPUs with bfloat16 dot "
                         "instructions (AVX512-BF16, AMX: ~1.8x float32), else float32 (AVX2 only: bfloat16 "
                         "weights ran 1.3x slower)")
    ap.add_argument("--hf-dtypes", default=None,
                    help="comma-separated dtypes to time HF transformers in (default: the engine's)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--prefix-len", type=int, default=1000)
    ap.add_argument("--attention-backend", default="auto", help="auto | xla | native | pallas (the engine's)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from jaxserve.checkpoint import load_model
    from jaxserve.checkpoint.registry import fetch_gguf
    from jaxserve.engine import Engine, EngineConfig

    rng = np.random.default_rng(0)
    prompts = rng.integers(100, 49000, (args.num_requests, args.input_len)).tolist()
    model = load_model(args.model, dtype=fastest_cpu_dtype() if args.dtype == "fastest" else args.dtype, progress=False)
    t0 = time.perf_counter()
    engine = Engine(model, EngineConfig(max_num_seqs=args.max_num_seqs,
                                        max_num_batched_tokens=args.max_num_batched_tokens,
                                        attention_backend=args.attention_backend))
    compile_s = time.perf_counter() - t0
    run_engine(engine, prompts[:4], 4)  # touch every path once
    ours = run_engine(engine, prompts, args.output_len)
    ceiling_s = matmul_only_seconds(model, args.num_requests, args.input_len, args.output_len,
                                    args.max_num_batched_tokens, args.max_num_seqs)
    ceiling = {"elapsed_s": ceiling_s, "output_throughput": args.num_requests * args.output_len / ceiling_s}
    flops = weight_matmul_flops(model.config, args.num_requests, args.input_len, args.output_len)
    peaks = dense_gemm_peak(model.dtype)
    roofline = {"weight_matmul_flops": flops, "gemm_peak_flops": peaks, "elapsed_s": flops / max(peaks.values())}
    roofline["output_throughput"] = args.num_requests * args.output_len / roofline["elapsed_s"]
    prefix = prefix_cache_ttft(engine, args.prefix_len, rng)
    hf_dtypes = [] if args.skip_hf else (args.hf_dtypes or model.dtype).split(",")
    hf = {d: run_transformers(fetch_gguf(args.model), prompts, args.output_len, d) for d in hf_dtypes}

    print(f"workload: {args.num_requests} requests x {args.input_len} in / {args.output_len} out, "
          f"EOS ignored; weights {model.dtype}; attention {engine.info().attention_backend}; compile {compile_s:.1f}s")
    print(f"{'system':<30}{'seconds':>9}{'out tok/s':>11}{'total tok/s':>13}")
    rows = [("jaxserve engine", ours), ("matmul-only ceiling", ceiling), ("roofline (best GEMM rate)", roofline)]
    rows += [(f"HF transformers ({d})", r) for d, r in hf.items()]
    for name, r in rows:
        print(f"{name:<30}{r['elapsed_s']:>9.2f}{r['output_throughput']:>11.1f}"
              f"{r.get('total_token_throughput', float('nan')):>13.1f}")
    print(f"TTFT mean {ours['mean_ttft_ms']:.0f} ms, p99 {ours['p99_ttft_ms']:.0f} ms; "
          f"TPOT mean {ours['mean_tpot_ms']:.1f} ms, p99 {ours['p99_tpot_ms']:.1f} ms")
    ratios = {"vs_matmul_ceiling": ours["output_throughput"] / ceiling["output_throughput"],
              "vs_roofline": ours["output_throughput"] / roofline["output_throughput"]}
    for d, r in hf.items():
        ratios[f"vs_hf_transformers_{d}"] = ours["output_throughput"] / r["output_throughput"]
        ratios[f"roofline_vs_hf_transformers_{d}"] = roofline["output_throughput"] / r["output_throughput"]
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"roofline: {flops / 1e12:.2f} TFLOP of weight matmuls; best {GEMM_SIZE}^3 {model.dtype} GEMM "
          + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()) + " GFLOP/s; engine ran "
          f"{flops / ours['elapsed_s'] / 1e9:.0f} GFLOP/s"
          + "".join(f", HF {d} {flops / r['elapsed_s'] / 1e9:.0f}" for d, r in hf.items()))
    print(f"prefix cache: {prefix['prefix_len']}-token shared prefix, TTFT cold {prefix['cold_ttft_ms']:.0f} ms, "
          f"cached {prefix['cached_ttft_ms']:.0f} ms ({prefix['speedup']:.1f}x, "
          f"{prefix['cached_prompt_tokens']} prompt tokens from cache)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
                       "dtype": model.dtype, "attention": engine.info().attention_backend, "compile_s": compile_s,
                       "engine": ours, "matmul_ceiling": ceiling, "roofline": roofline, "hf": hf,
                       "ratios": ratios, "prefix_cache": prefix}, f, indent=2, default=float)


if __name__ == "__main__":
    main()
