"""Disaggregated vs colocated serving under prefill bursts (issue 18), in one process on 8 virtual
CPU devices, through the pools the server uses (no gRPC: the comparison is the engines').

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/disagg.py --json benchmarks/disagg_cpu.json

Workload: `--streams` requests decode steadily (random prompts of `--stream-prompt` tokens, greedy,
`--stream-tokens` out) while `--bursts` bursts of `--burst-size` long prompts (`--long-prompt`
tokens, `--long-tokens` out) arrive every `--burst-every` seconds. Colocated: one engine
(`--colocated-mesh`). Split: `--disagg-mesh` (prefill and decode engines on disjoint devices,
KV handed over with jax.device_put), once with the pages as stored and once as int8 on the wire.
Configurations alternate over `--rounds` (the machine drifts). Reported per configuration: the
decode streams' inter-token latency p50/p99 and TPOT, the long prompts' TTFT, goodput (requests
meeting the TTFT and TPOT SLOs), and per transferred request its bytes, transfer time and
prefill time.

On a CPU host the "disjoint devices" are virtual: both sides' programs run on the same cores, so
a prefill step still slows the decode steps running beside it; the split removes the decode
steps' wait for the prefill chunk in the same batch, not the competition for the cores.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import numpy as np  # noqa: E402


def pct(values, q):
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


async def one(pool, rid, prompt, max_tokens, record):
    from jaxserve import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start, times = time.perf_counter(), []
    async with pool.generate(prompt, params, rid, 0) as deltas:
        async for delta in deltas:
            if delta.new_token_ids:
                times.append(time.perf_counter())
    record.append(dict(id=rid, ttft=times[0] - start, itl=list(np.diff(times)),
                       tpot=(times[-1] - times[0]) / max(1, len(times) - 1)))


async def workload(pool, args, seed):
    rng = np.random.default_rng(seed)
    streams, longs = [], []
    tasks = [asyncio.create_task(one(pool, f"s{seed}-{i}", rng.integers(100, 30000, args.stream_prompt).tolist(),
                                     args.stream_tokens, streams)) for i in range(args.streams)]
    await asyncio.sleep(args.warmup)
    for b in range(args.bursts):
        tasks += [asyncio.create_task(one(pool, f"l{seed}-{b}-{j}", rng.integers(100, 30000, args.long_prompt).tolist(),
                                          args.long_tokens, longs)) for j in range(args.burst_size)]
        await asyncio.sleep(args.burst_every)
    await asyncio.gather(*tasks)
    return streams, longs


def summarize(streams, longs, stats, args) -> dict:
    itl = [x for r in streams for x in r["itl"]]
    reqs = streams + longs
    good = sum(1 for r in reqs if r["ttft"] * 1e3 <= args.slo_ttft_ms and r["tpot"] * 1e3 <= args.slo_tpot_ms)
    out = dict(itl_p50_ms=pct(itl, 50), itl_p99_ms=pct(itl, 99), itl_max_ms=max(itl) * 1e3,
               tpot_p50_ms=pct([r["tpot"] for r in streams], 50), tpot_p99_ms=pct([r["tpot"] for r in streams], 99),
               long_ttft_p50_ms=pct([r["ttft"] for r in longs], 50), long_ttft_p99_ms=pct([r["ttft"] for r in longs], 99),
               goodput=good / len(reqs),
               requests=[dict(kind="stream", ttft=r["ttft"], tpot=r["tpot"]) for r in streams] +
                        [dict(kind="long", ttft=r["ttft"], tpot=r["tpot"]) for r in longs])
    if stats.transfers_completed:
        out.update(transfers=stats.transfers_completed, bytes_per_request=stats.transfer_bytes / stats.transfers_completed,
                   transfer_ms_per_request=1e3 * stats.transfer_seconds / stats.transfers_completed,
                   transfer_failures=stats.transfer_failures,
                   prefill_ms_per_request=1e3 * stats.export_prefill_seconds / max(1, stats.exports))
    return out


def wire_quality(pools, args) -> dict:
    """The int8 wire's cost: greedy continuations of windows of an English text through the exact
    and the int8 split pools, compared token by token (and the chosen tokens' logprobs)."""
    from jaxserve import SamplingParams

    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "alice_ch1-3.txt")).read()
    ids = pools["split"].tokenizer.encode(text)
    step = max(1, (len(ids) - args.quality_context) // args.quality_windows)
    windows = [ids[i * step:i * step + args.quality_context] for i in range(args.quality_windows)]
    params = SamplingParams(max_tokens=args.quality_tokens, temperature=0, ignore_eos=True, logprobs=0)

    async def continuation(pool, rid, prompt):
        tokens, lps = [], []
        async with pool.generate(prompt, params, rid, 0) as deltas:
            async for delta in deltas:
                tokens += delta.new_token_ids
                lps += [s.logprob for s in delta.logprobs or ()]
        return tokens, lps

    async def run(kind):
        return await asyncio.gather(*(continuation(pools[kind], f"q-{kind}-{i}", w) for i, w in enumerate(windows)))

    exact, narrow = asyncio.run(run("split")), asyncio.run(run("split-int8"))
    equal = sum(a == b for (ta, _), (tb, _) in zip(exact, narrow) for a, b in zip(ta, tb))
    diffs = []
    for (ta, la), (tb, lb) in zip(exact, narrow):
        for a, b, x, y in zip(ta, tb, la, lb):
            if a != b:
                break
            diffs.append(abs(x - y))
    return dict(windows=len(windows), token_agreement=equal / sum(len(t) for t, _ in exact),
                identical_outputs=sum(ta == tb for (ta, _), (tb, _) in zip(exact, narrow)),
                mean_abs_logprob_diff=float(np.mean(diffs)) if diffs else float("nan"))


def since(before, after):
    """The pool's transfer counters over one run."""
    names = ("transfers_completed", "transfer_failures", "transfer_bytes", "transfer_seconds", "exports",
             "export_prefill_seconds")
    return dataclasses.replace(after, **{n: getattr(after, n) - getattr(before, n) for n in names})


def start(kind, args):
    from jaxserve.engine import EngineConfig
    from jaxserve.parallel import parse_deployment
    from jaxserve.server import start_pool

    wire = "int8" if kind == "split-int8" else "auto"
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_memory=args.kv_cache_memory << 20, kv_transfer_dtype=wire)
    mesh = parse_deployment(args.colocated_mesh if kind == "colocated" else args.disagg_mesh)
    pool, _ = start_pool(args.model, "auto", config, mesh, max_queued_requests=256, progress=False)
    return pool


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--colocated-mesh", default="tp=1")
    ap.add_argument("--disagg-mesh", default="prefill:tp=1 decode:tp=1")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-prompt", type=int, default=64)
    ap.add_argument("--stream-tokens", type=int, default=96)
    ap.add_argument("--long-prompt", type=int, default=2000)
    ap.add_argument("--long-tokens", type=int, default=8)
    ap.add_argument("--bursts", type=int, default=2)
    ap.add_argument("--burst-size", type=int, default=2)
    ap.add_argument("--burst-every", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of steady decoding before the first burst")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--kv-cache-memory", type=int, default=512, help="MiB per device")
    # Set for a 2-core CPU host (a 2,000-token prefill alone takes ~15-30 s there); an accelerator's are far lower.
    ap.add_argument("--slo-ttft-ms", type=float, default=60000)
    ap.add_argument("--slo-tpot-ms", type=float, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quality-windows", type=int, default=16, help="windows for the int8 wire's quality check (0: off)")
    ap.add_argument("--quality-context", type=int, default=512)
    ap.add_argument("--quality-tokens", type=int, default=32)
    ap.add_argument("--kinds", nargs="+", default=["colocated", "split", "split-int8"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from jaxserve.cli.options import enable_compilation_cache

    enable_compilation_cache()
    pools = {kind: start(kind, args) for kind in args.kinds}
    results = {kind: [] for kind in args.kinds}
    for kind, pool in pools.items():  # first use of every program, and the long prompt's buckets
        asyncio.run(one(pool, f"warm-{kind}", list(range(100, 100 + args.long_prompt)), 2, []))
    for rnd in range(args.rounds):
        for kind in (args.kinds if rnd % 2 == 0 else args.kinds[::-1]):  # interleaved
            before = asyncio.run(pools[kind].stats())
            streams, longs = asyncio.run(workload(pools[kind], args, seed=rnd))
            stats = since(before, asyncio.run(pools[kind].stats()))
            results[kind].append(summarize(streams, longs, stats, args))
            print(f"round {rnd} {kind}: { {k: v for k, v in results[kind][-1].items() if k != 'requests'} }", flush=True)
    quality = wire_quality(pools, args) if {"split", "split-int8"} <= set(pools) and args.quality_windows else None
    for pool in pools.values():
        pool.shutdown()
    header = f"{'config':12s} {'ITL p50':>9s} {'ITL p99':>9s} {'TPOT p50':>9s} {'long TTFT p50':>14s} {'goodput':>8s} " \
             f"{'KiB/req':>8s} {'xfer ms/req':>11s} {'prefill ms/req':>14s}"
    print(header)
    table = {}
    for kind, runs in results.items():
        if not runs:
            continue
        med = {k: float(np.median([r[k] for r in runs if k in r])) for k in runs[-1] if k != "requests"}
        table[kind] = med
        print(f"{kind:12s} {med['itl_p50_ms']:9.1f} {med['itl_p99_ms']:9.1f} {med['tpot_p50_ms']:9.1f} "
              f"{med['long_ttft_p50_ms']:14.1f} {med['goodput']:8.2f} {med.get('bytes_per_request', 0) / 1024:8.1f} "
              f"{med.get('transfer_ms_per_request', 0):11.1f} {med.get('prefill_ms_per_request', 0):14.1f}")
    if "colocated" in table and "split" in table:
        print(f"decode ITL p99, split / colocated: {table['split']['itl_p99_ms'] / table['colocated']['itl_p99_ms']:.2f}")
    if quality:
        print(f"int8 wire vs exact wire, {quality['windows']} windows of {args.quality_context} tokens of "
              f"Alice ch. I-III, {args.quality_tokens} greedy tokens each: {quality['token_agreement']:.3f} of tokens "
              f"equal, {quality['identical_outputs']} outputs identical, mean |logprob diff| over the common prefix "
              f"{quality['mean_abs_logprob_diff']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                           date=time.strftime("%Y-%m-%d"), rounds=results, median=table, wire_quality=quality), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
