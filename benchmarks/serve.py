"""Online serving benchmark of `jaxserve serve` over gRPC (as `vllm bench serve`).

    python benchmarks/serve.py --launch --num-prompts 64 --input-len 128 --output-len 128 \
        --request-rate 1 2 4 inf --max-num-seqs 64 --max-num-batched-tokens 512 \
        --json serve.json --plot serve.png

Random prompt token ids (seeded; a fresh set per rate, so no run hits the prefix cache of an
earlier one), greedy, EOS ignored. Arrivals are Poisson at each `--request-rate` (inf: all at
once), optionally capped by `--max-concurrency`. Latencies are measured on the client side. With
`--launch` the script first runs the engine offline on the saturating run's prompts with the same
engine options (benchmarks/throughput.py's `run_engine`), then starts the server, sweeps the rates
and stops it, then runs the engine offline once more; the table reports the server's output
throughput at the highest rate over the mean of the two offline runs.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package

SLO_KEYS = ("ttft", "tpot", "e2el")


def make_prompts(seed: int, num: int, length: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(100, 30000, (num, length)).tolist()


def engine_args(args) -> list[str]:
    out = ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    return out + (["--kv-cache-memory", args.kv_cache_memory] if args.kv_cache_memory else [])


def offline_baseline(args, prompts) -> dict:
    """The engine alone on `prompts`, after a warm-up on other prompts (the server gets one too)."""
    from throughput import run_engine

    from jaxserve.checkpoint import load_model
    from jaxserve.cli.options import enable_compilation_cache, size
    from jaxserve.engine import Engine, EngineConfig

    enable_compilation_cache()  # shares compiled steps with the server launched next
    kv = size(args.kv_cache_memory) if args.kv_cache_memory else None
    engine = Engine(load_model(args.model, progress=False),
                    EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                 kv_cache_memory=kv))
    run_engine(engine, make_prompts(args.seed + 10_000, min(4, len(prompts)), args.input_len), 4)
    return {k: float(v) for k, v in run_engine(engine, prompts, args.output_len).items()}


def run_offline(args, prompts) -> dict:
    print("offline engine baseline ...", flush=True)
    r = offline_baseline(args, prompts)
    print(f"offline engine: {r['output_throughput']:.1f} out tok/s, {r['total_token_throughput']:.1f} total tok/s "
          f"in {r['elapsed_s']:.1f}s", flush=True)
    return r


def launch_server(args) -> tuple[subprocess.Popen, str]:
    host, port = args.server.rsplit(":", 1)
    with socket.socket() as s:  # else a server already there would answer the health checks
        if s.connect_ex((host, int(port))) == 0:
            raise SystemExit(f"--launch: something already listens on {args.server}; pick another --server port")
    log = tempfile.NamedTemporaryFile("w+", prefix="jaxserve-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "jaxserve.cli", "--log-level", "INFO", "serve", "--model", args.model,
           "--host", host, "--port", port, *engine_args(args)]
    print("launching: " + " ".join(cmd[1:]) + f"  (log: {log.name})", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log.name


def wait_ready(proc, log_path: str, target: str, timeout: float) -> None:
    from jaxserve.client import Client, JaxServeError

    deadline = time.monotonic() + timeout
    with Client(target) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} during start-up:\n{tail(log_path)}")
            try:
                if client.health(timeout=2) == "SERVING":
                    return
            except JaxServeError:
                pass
            time.sleep(1)
    raise RuntimeError(f"server at {target} not SERVING after {timeout:.0f}s\n{tail(log_path) if log_path else ''}")


def stop_server(proc) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def tail(path: str, lines: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


async def one_request(client, prompt, output_len: int, sem) -> dict:
    from jaxserve.client import JaxServeError

    rec = {"ok": False, "code": None, "ttft": None, "itl": [], "e2el": None, "prompt_tokens": len(prompt),
           "output_tokens": 0}
    async with sem or contextlib.nullcontext():
        start = last = time.perf_counter()
        try:
            async for d in client.stream(prompt, max_tokens=output_len, temperature=0, ignore_eos=True):
                now = time.perf_counter()
                if d.token_ids:
                    if rec["ttft"] is None:
                        rec["ttft"] = now - start
                    else:
                        rec["itl"].append(now - last)
                    last = now
                    rec["output_tokens"] += len(d.token_ids)
                if d.finished and d.usage:
                    rec["output_tokens"], rec["prompt_tokens"] = d.usage.completion_tokens, d.usage.prompt_tokens
            rec["e2el"], rec["ok"] = time.perf_counter() - start, True
        except JaxServeError as e:
            rec["code"] = e.code.name
    return rec


async def run_rate(target: str, prompts, output_len: int, rate: float, max_concurrency: int | None,
                   seed: int) -> tuple[list[dict], float]:
    """Sends `prompts` with Poisson arrivals at `rate` req/s; returns per-request records and the duration."""
    from jaxserve.client import AsyncClient

    gaps = np.random.default_rng(seed).exponential(1 / rate, len(prompts)) if math.isfinite(rate) else None
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)[:-1]]) if gaps is not None else np.zeros(len(prompts))
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with AsyncClient(target) as client:
        start, tasks = time.perf_counter(), []
        for prompt, at in zip(prompts, arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(client, prompt, output_len, sem)))
        records = await asyncio.gather(*tasks)
    return records, time.perf_counter() - start


def stats(name: str, values_s) -> dict:
    v = np.asarray(values_s, dtype=float) * 1e3
    if v.size == 0:
        return {f"{k}_{name}_ms": float("nan") for k in ("mean", "median", "p99")}
    return {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
            f"p99_{name}_ms": float(np.percentile(v, 99))}


def summarize(records, duration: float, goodput: dict) -> dict:
    ok = [r for r in records if r["ok"]]
    tpot = [(r["e2el"] - r["ttft"]) / (r["output_tokens"] - 1) if r["output_tokens"] > 1 else 0.0 for r in ok]
    n_out, n_in = sum(r["output_tokens"] for r in ok), sum(r["prompt_tokens"] for r in ok)
    out = {"duration_s": duration, "completed": len(ok), "failed": len(records) - len(ok),
           "failed_codes": dict(collections.Counter(r["code"] for r in records if not r["ok"])),
           "total_input_tokens": n_in, "total_output_tokens": n_out, "request_throughput": len(ok) / duration,
           "output_throughput": n_out / duration, "total_token_throughput": (n_in + n_out) / duration}
    out |= stats("ttft", [r["ttft"] or 0.0 for r in ok]) | stats("tpot", tpot)
    out |= stats("itl", [g for r in ok for g in r["itl"]]) | stats("e2el", [r["e2el"] for r in ok])
    if goodput:
        good = sum(all(v * 1e3 <= goodput[k] for k, v in zip(SLO_KEYS, (r["ttft"] or 0.0, t, r["e2el"]))
                       if k in goodput) for r, t in zip(ok, tpot))
        out["goodput"] = good / duration
    return out


HEADER = (f"{'rate':>6} {'ok/fail':>8} {'dur s':>7} {'req/s':>6} {'out tok/s':>9} {'tot tok/s':>9} "
          f"{'TTFT mean/med/p99 ms':>22} {'TPOT mean/med/p99 ms':>20} {'ITL mean/p99':>13} "
          f"{'E2EL mean/p99 ms':>17} {'goodput':>7}")


def row(rate: float, r: dict) -> str:
    def trio(name):
        return "/".join(f"{r[f'{k}_{name}_ms']:.0f}" for k in ("mean", "median", "p99"))
    return (f"{rate:>6g} {r['completed']:>4}/{r['failed']:<3} {r['duration_s']:>7.1f} {r['request_throughput']:>6.2f} "
            f"{r['output_throughput']:>9.1f} {r['total_token_throughput']:>9.1f} {trio('ttft'):>22} "
            f"{trio('tpot'):>20} {r['mean_itl_ms']:>6.0f}/{r['p99_itl_ms']:<6.0f} "
            f"{r['mean_e2el_ms']:>8.0f}/{r['p99_e2el_ms']:<8.0f} {r.get('goodput', float('nan')):>7.2f}")


def plot(path: str, runs: list[dict], offline: dict | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["request_throughput"] for r in runs]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("mean_ttft_ms", "TTFT mean"), ("p99_ttft_ms", "TTFT p99"), ("mean_tpot_ms", "TPOT mean"),
                       ("mean_e2el_ms", "E2EL mean")):
        lat.plot(x, [r[key] for r in runs], "o-", label=label)
    lat.set(xlabel="achieved request rate (req/s)", ylabel="latency (ms)", yscale="log", title="latency")
    for key, label in (("output_throughput", "output tok/s"), ("total_token_throughput", "total tok/s")):
        thr.plot(x, [r[key] for r in runs], "o-", label=label)
    if offline:
        thr.axhline(offline["output_throughput"], ls="--", c="gray", label="offline engine output tok/s")
    thr.set(xlabel="achieved request rate (req/s)", ylabel="tokens/s", title="throughput")
    for ax in (lat, thr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_goodput(items) -> dict:
    slos = {}
    for item in items or ():
        key, _, ms = item.partition(":")
        if key not in SLO_KEYS or not ms:
            raise SystemExit(f"--goodput: expected KEY:MS with KEY in {SLO_KEYS}, got {item!r}")
        slos[key] = float(ms)
    return slos


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the server (or to launch it on)")
    ap.add_argument("--launch", action="store_true", help="start `jaxserve serve` here, stop it at the end")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--kv-cache-memory", default=None, help="e.g. 1G (default: the engine's)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-rate", type=float, nargs="+", default=[math.inf], help="req/s, one run each; inf")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    ap.add_argument("--offline-baseline", action=argparse.BooleanOptionalAction, default=None,
                    help="engine throughput offline first (default: on with --launch)")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG: latency and throughput against achieved request rate")
    args = ap.parse_args(argv)
    if min(args.request_rate) <= 0 or args.num_prompts <= 0 or args.output_len <= 0 or args.input_len <= 0:
        ap.error("--request-rate, --num-prompts, --input-len and --output-len must be positive")
    args.offline_baseline = args.launch if args.offline_baseline is None else args.offline_baseline
    args.slos = parse_goodput(args.goodput)
    return args


def sweep(args, prompt_sets) -> tuple[list[dict], dict]:
    from google.protobuf.json_format import MessageToDict

    from jaxserve.client import Client

    with Client(args.server) as client:
        info = client.server_info(timeout=10)
    warm = make_prompts(args.seed + 10_000, min(4, args.num_prompts), args.input_len)
    asyncio.run(run_rate(args.server, warm, 4, math.inf, None, args.seed))  # warm-up, not reported
    print(f"server: {info.platform} {info.mesh}, attention {info.attention_backend}, kv {info.kv_cache_dtype}, "
          f"{info.pages_total} pages x {info.page_size}, max_num_seqs {info.max_num_seqs}", flush=True)
    print(HEADER, flush=True)
    runs = []
    for i, rate in enumerate(args.request_rate):
        records, duration = asyncio.run(run_rate(args.server, prompt_sets[i], args.output_len, rate,
                                                 args.max_concurrency, args.seed + i))
        runs.append({"request_rate": rate} | summarize(records, duration, args.slos))
        print(row(rate, runs[-1]), flush=True)
    return runs, MessageToDict(info, preserving_proto_field_name=True)


def finite(obj):
    """JSON has no inf/nan: those become strings."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return str(obj) if isinstance(obj, float) and not math.isfinite(obj) else obj


def main(argv=None):
    args = parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # fail now, not after the sweep
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'")
    prompt_sets = [make_prompts(args.seed + i, args.num_prompts, args.input_len) for i in range(len(args.request_rate))]
    top = int(np.argmax(args.request_rate))  # the saturating run: inf when swept
    offline_runs = [run_offline(args, prompt_sets[top])] if args.offline_baseline else []
    proc = log_path = None
    try:
        if args.launch:
            proc, log_path = launch_server(args)
        wait_ready(proc, log_path, args.server, args.startup_timeout)
        runs, server_info = sweep(args, prompt_sets)
    finally:
        if proc is not None:
            print(f"server stopped (exit {stop_server(proc)})", flush=True)
    if offline_runs:  # again after the server: the mean of both brackets machine drift
        offline_runs.append(run_offline(args, prompt_sets[top]))
    offline = {k: float(np.mean([r[k] for r in offline_runs])) for k in offline_runs[0]} if offline_runs else None
    ratio = runs[top]["output_throughput"] / offline["output_throughput"] if offline else None
    if ratio is not None:
        print(f"server/offline output throughput at rate {args.request_rate[top]:g}: {ratio:.3f} "
              f"({runs[top]['output_throughput']:.1f} / {offline['output_throughput']:.1f} tok/s, "
              f"the mean of the offline runs before and after)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(finite({"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                          "cpus": os.cpu_count()}, "server": server_info,
                              "offline": offline, "offline_runs": offline_runs, "runs": runs,
                              "server_over_offline": ratio}), f, indent=2)
    if args.plot:
        plot(args.plot, runs, offline)


if __name__ == "__main__":
    main()
