"""Mixture-of-experts: one MoE layer's grouped SwiGLU on this machine, dynamic expert skipping, and
end-to-end engine throughput of a random-weight MoE model next to SmolLM2-135M.

    python benchmarks/moe.py --json benchmarks/moe_cpu.json             # everything (~10 min)
    python benchmarks/moe.py --sections layer --tokens 512,1024          # the layer table only

Layer (float32, Mixtral proportions scaled to this machine: hidden 1024, expert FFN 2816, 8 experts,
top-2, a random router): for each token count, in interleaved rounds, the time of
  rounds      the CPU path jaxserve runs (jaxserve/ops/moe.py: rounds of one batched matmul over
              the experts, each taking its next rows of the sorted assignments)
  ragged_dot  the same dispatch with jax.lax.ragged_dot as the grouped matmul
  per_expert  the same dispatch with a loop of per-expert matmuls over 128-row chunks of each
              expert's rows (dynamic trip counts, the last chunk masked)
  dense       every expert over every token (a batched matmul), weighted by the combine weights
and the roofline: the active experts' FLOPs (tokens x k x 3 matmuls) at this machine's best GEMM
rate, measured in the same run (benchmarks/throughput.py's dense_gemm_peak).

Skipping: the fraction of routed-expert FLOPs moe_min_router_weight / moe_top_p skip on the layer,
the time saved, and, as the only quality figure without a trained MoE, how far the logits of a
random-weight MoE model move (max |delta log-prob| over a batch of prompts).

Engine: 64 requests x 128 in / 128 out through the paged engine, a random-weight Mixtral-style model
with SmolLM2-135M's attention and active FFN size (8 experts of width 768, top-2) and SmolLM2-135M
itself, in the same run and dtype.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from throughput import dense_gemm_peak, fastest_cpu_dtype, run_engine  # noqa: E402

LAYER = dict(hidden=1024, ffn=2816, experts=8, top_k=2)
SKIP_SETTINGS = [dict(moe_min_router_weight=0.2), dict(moe_min_router_weight=0.35), dict(moe_top_p=0.6)]


def layer_config(**router):
    from jaxserve.config import ModelConfig

    d, f, e, k = LAYER["hidden"], LAYER["ffn"], LAYER["experts"], LAYER["top_k"]
    return ModelConfig("mixtral", 32000, d, f, 1, 8, 8, d // 8, 4096, num_experts=e, num_experts_per_token=k,
                       moe_intermediate_size=f, **router)


def layer_params(seed: int = 0, router_scale: float = 1.0):
    """Random float32 weights of one MoE layer. The router is scaled so its logits have std ~
    router_scale (trained routers are peaked; a plain 0.02-init router is almost uniform)."""
    import jax
    import jax.numpy as jnp

    d, f, e = LAYER["hidden"], LAYER["ffn"], LAYER["experts"]
    keys = jax.random.split(jax.random.key(seed), 4)
    return {"router": jax.random.normal(keys[0], (d, e), jnp.float32) * router_scale / d ** 0.5,
            "we_gate": jax.random.normal(keys[1], (e, d, f), jnp.float32) * 0.02,
            "we_up": jax.random.normal(keys[2], (e, d, f), jnp.float32) * 0.02,
            "we_down": jax.random.normal(keys[3], (e, f, d), jnp.float32) * 0.02}


def _dense_all_experts(p, x, cfg):
    """Every expert over every token: the baseline a dispatch must beat."""
    import jax
    import jax.numpy as jnp

    from jaxserve.ops.moe import _batched, route

    weights, experts = route(x, p["router"], cfg)
    combine = jnp.zeros((x.shape[0], cfg.num_experts), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], experts].add(weights)   # [T, E]
    xs = jnp.broadcast_to(x, (cfg.num_experts, *x.shape))                          # [E, T, D]
    h = jax.nn.silu(_batched(xs, p["we_gate"])) * _batched(xs, p["we_up"])
    return jnp.einsum("etd,te->td", _batched(h, p["we_down"]), combine)


def _per_expert_loop(rows, sizes, wg, wu, wd, chunk: int = 128):
    """The alternative: per expert (a static loop), its rows in chunks through its own weights."""
    import jax.numpy as jnp
    from jax import lax

    from jaxserve.models.layers import swiglu

    r, d = rows.shape
    ends = jnp.cumsum(sizes)
    padded = jnp.pad(rows, ((0, chunk), (0, 0)))
    out = jnp.zeros((r + chunk, d), jnp.float32)
    for e in range(wg.shape[0]):
        def body(c, out, e=e):
            start = ends[e] - sizes[e] + c * chunk
            y = swiglu(lax.dynamic_slice_in_dim(padded, start, chunk), wg[e], wu[e], wd[e])
            mine = (start + jnp.arange(chunk)) < ends[e]
            y = jnp.where(mine[:, None], y, lax.dynamic_slice_in_dim(out, start, chunk))
            return lax.dynamic_update_slice_in_dim(out, y, start, 0)
        out = lax.fori_loop(0, (sizes[e] + chunk - 1) // chunk, body, out)
    return out[:r]


def layer_functions(cfg):
    import jax

    from jaxserve.ops import moe

    def per_expert(p, x):
        weights, experts = moe.route(x, p["router"], cfg)
        rows, sizes, order = moe.sort_by_expert(x, experts, cfg.num_experts)
        y = _per_expert_loop(rows, sizes, p["we_gate"], p["we_up"], p["we_down"])
        return moe.combine(y, order, weights, experts, cfg.num_experts)

    return {"rounds": jax.jit(functools.partial(moe.routed_experts, cfg=cfg, impl="rounds")),
            "ragged_dot": jax.jit(functools.partial(moe.routed_experts, cfg=cfg, impl="ragged_dot")),
            "per_expert": jax.jit(per_expert),
            "dense": jax.jit(functools.partial(_dense_all_experts, cfg=cfg))}


def time_call(fn, *args, reps: int = 3) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def active_flops(tokens: int) -> float:
    return 2.0 * tokens * LAYER["top_k"] * 3 * LAYER["hidden"] * LAYER["ffn"]


def bench_layer(token_counts, rounds: int, peak: float) -> list[dict]:
    import jax

    cfg = layer_config()
    p = layer_params()
    fns = layer_functions(cfg)
    rows = []
    for t in token_counts:
        x = jax.random.normal(jax.random.key(t), (t, LAYER["hidden"]))
        skip_dense = t > 1024   # all-experts dense at 2048 tokens takes ~10 s a call; 1024 suffices
        times = {name: [] for name in fns if not (skip_dense and name == "dense")}
        for _ in range(rounds):  # interleaved: the machine drifts between minutes
            for name in times:
                times[name].append(time_call(fns[name], p, x, reps=2))
        best = {name: min(v) for name, v in times.items()}
        roofline = active_flops(t) / peak
        row = {"tokens": t, **{f"{k}_ms": v * 1e3 for k, v in best.items()}, "roofline_ms": roofline * 1e3,
               "rounds_vs_roofline": roofline / best["rounds"]}
        if "dense" in best:
            row["dense_over_rounds"] = best["dense"] / best["rounds"]
        rows.append(row)
        print(f"{t:>7}" + "".join(f"{row.get(k + '_ms', float('nan')):>12.1f}" for k in fns)
              + f"{row['roofline_ms']:>12.1f}{row['rounds_vs_roofline']:>10.2f}"
              f"{row.get('dense_over_rounds', float('nan')):>10.2f}", flush=True)
    return rows


def bench_skipping(tokens: int, rounds: int, router_scale: float) -> list[dict]:
    """Fraction of routed-expert rows skipped and the layer time with each skip setting."""
    import jax

    from jaxserve.ops.moe import routed_experts, route

    p = layer_params(router_scale=router_scale)
    x = jax.random.normal(jax.random.key(1), (tokens, LAYER["hidden"]))
    settings = [{}] + SKIP_SETTINGS
    cfgs = [layer_config(**s) for s in settings]
    fns = [jax.jit(functools.partial(routed_experts, cfg=c, impl="rounds")) for c in cfgs]
    times = [[] for _ in settings]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(time_call(fn, p, x, reps=2))
    rows = []
    for s, c, t in zip(settings, cfgs, times):
        _, experts = route(x, p["router"], c)
        skipped = float(np.mean(np.asarray(experts) == c.num_experts))
        rows.append({"setting": s or "off", "router_logit_std": router_scale, "tokens": tokens,
                     "expert_flops_skipped": skipped, "ms": min(t) * 1e3,
                     "time_saved": 1 - min(t) / min(times[0])})
        print(f"{json.dumps(s or 'off'):<34}{router_scale:>6.1f}{skipped:>10.1%}{min(t) * 1e3:>10.1f}"
              f"{rows[-1]['time_saved']:>10.1%}", flush=True)
    return rows


def skipping_divergence(num_prompts: int = 8, prompt_len: int = 64) -> list[dict]:
    """How far skipping moves a random-weight MoE model: |delta log-prob| of every prompt token."""
    from jaxserve import SamplingParams
    from jaxserve.llm import LLM

    model = random_moe_model("float32", num_layers=4)
    prompts = np.random.default_rng(0).integers(0, model.config.vocab_size, (num_prompts, prompt_len)).tolist()

    def prompt_logprobs(**router):
        llm = LLM(model, progress=False, max_num_seqs=num_prompts, num_pages=128, max_model_len=256, **router)
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True))
        return np.array([o.prompt_logprobs[1:] for o in outs], np.float64)

    base = prompt_logprobs()
    rows = []
    for s in SKIP_SETTINGS:
        delta = np.abs(prompt_logprobs(**s) - base)
        rows.append({"setting": s, "max_abs_delta_prompt_logprob": float(delta.max()),
                     "mean_abs_delta_prompt_logprob": float(delta.mean())})
        print(f"{json.dumps(s):<34} max |d logprob| {delta.max():.3f}, mean {delta.mean():.4f}", flush=True)
    return rows


def random_moe_model(dtype: str, num_layers: int = 30):
    """A random-weight Mixtral-style LoadedModel with SmolLM2-135M's attention and active FFN width
    (8 experts of 768, top-2 = SmolLM2's 1536), tied embeddings, its vocabulary."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxserve.checkpoint import LoadedModel
    from jaxserve.config import ModelConfig
    from jaxserve.models import Transformer
    from jaxserve.models.layers import as_stored

    cfg = ModelConfig("mixtral", 49152, 576, 768, num_layers, 9, 3, 64, 8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True, num_experts=8, num_experts_per_token=2, moe_intermediate_size=768)
    graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0), jnp.dtype(dtype)))
    pure = nnx.to_pure_dict(state)
    pure["layers"]["router"] = pure["layers"]["router"] * 50.0   # logits std ~1 rather than ~0.02
    if jax.default_backend() == "cpu":
        pure["layers"] = {k: as_stored(v) for k, v in pure["layers"].items()}
    nnx.replace_by_pure_dict(state, pure)
    return LoadedModel(cfg, graphdef, state, None, dtype, "random-moe-smollm2-size")


def bench_engine(dtype: str, num_requests: int, input_len: int, output_len: int) -> dict:
    from jaxserve.checkpoint import load_model
    from jaxserve.engine import Engine, EngineConfig

    config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=512)
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, 49000, (num_requests, input_len)).tolist()
    results = {}
    for name, make in (("smollm2-135m", lambda: load_model("smollm2-135m", dtype=dtype, progress=False)),
                       ("random MoE (8 experts, top-2)", lambda: random_moe_model(dtype))):
        t0 = time.perf_counter()
        engine = Engine(make(), config)
        compile_s = time.perf_counter() - t0
        run_engine(engine, prompts[:4], 4)
        r = run_engine(engine, prompts, output_len)
        results[name] = {"compile_s": compile_s, **r}
        print(f"{name:<34}{r['elapsed_s']:>9.2f}{r['output_throughput']:>11.1f}{r['total_token_throughput']:>13.1f}"
              f"{compile_s:>10.1f}", flush=True)
        del engine
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="layer,skipping,engine")
    ap.add_argument("--tokens", default="64,128,256,512,1024,2048")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="fastest", choices=["fastest", "float32", "bfloat16"], help="engine weights")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    out = {"args": vars(args), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"), "layer_shape": LAYER}
    if "layer" in sections or "skipping" in sections:
        out["gemm_peak_flops"] = dense_gemm_peak("float32")
        peak = max(out["gemm_peak_flops"].values())
        print(f"best float32 GEMM: {peak / 1e9:.0f} GFLOP/s")
    if "layer" in sections:
        print(f"one MoE layer, float32, hidden {LAYER['hidden']}, expert FFN {LAYER['ffn']}, "
              f"{LAYER['experts']} experts, top-{LAYER['top_k']} (ms, best of {args.rounds} interleaved rounds)")
        print(f"{'tokens':>7}{'rounds':>12}{'ragged_dot':>12}{'per_expert':>12}{'dense':>12}{'roofline':>12}"
              f"{'of roof':>10}{'dense/x':>10}")
        out["layer"] = bench_layer([int(t) for t in args.tokens.split(",")], args.rounds, peak)
    if "skipping" in sections:
        print(f"\ndynamic expert skipping, 512 tokens: {'setting':<20}{'logit std':>9}{'skipped':>10}{'ms':>10}{'saved':>10}")
        out["skipping"] = [r for scale in (1.0, 3.0) for r in bench_skipping(512, args.rounds, scale)]
        print("logit divergence of a random-weight 4-layer MoE model (prompt log-probs, 8 x 64 tokens):")
        out["skipping_divergence"] = skipping_divergence()
    if "engine" in sections:
        dtype = fastest_cpu_dtype() if args.dtype == "fastest" else args.dtype
        print(f"\nengine, {args.num_requests} requests x {args.input_len} in / {args.output_len} out, {dtype}")
        print(f"{'model':<34}{'seconds':>9}{'out tok/s':>11}{'total tok/s':>13}{'compile s':>10}")
        out["engine"] = bench_engine(dtype, args.num_requests, args.input_len, args.output_len)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
