"""Decode attention on CPU: the native C++ kernel (jaxserve/ops/native) against the XLA path it
replaces, on SmolLM2-135M shapes (30 layers, 9 query / 3 kv heads, head_dim 64, page size 16).

    python benchmarks/decode_attention_cpu.py --json benchmarks/decode_attention_cpu.json

Times one decode step's attention over all layers (a scan, as in the model) for a batch of
single-token queries with the given context lengths, per page format, and the KV bytes read.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.ops.attention import attend, plan_attention
from pallas_kernels.kv_quant import FORMATS, KVPages, quantize

LAYERS, HEADS, KV_HEADS, HEAD_DIM, PAGE = 30, 9, 3, 64, 16


def make_batch(fmt_name: str, batch: int, context: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-context // PAGE)
    num_pages = batch * pages_per_seq + 1
    shape = (LAYERS, num_pages, PAGE, KV_HEADS, HEAD_DIM)
    fmt = FORMATS[fmt_name]
    chan = jnp.full((KV_HEADS, HEAD_DIM), 0.05, jnp.float32) if fmt.quantized else None  # codes span the range
    k, v = (quantize(jnp.asarray(rng.standard_normal(shape), jnp.float32), chan, fmt)[0] for _ in range(2))
    tables = 1 + rng.permutation(batch * pages_per_seq).reshape(batch, pages_per_seq).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((batch, HEADS, HEAD_DIM)), jnp.float32)
    kv_lens = np.full(batch, context, np.int32)
    cu_q_lens = np.arange(batch + 1, dtype=np.int32)
    return q, KVPages(k, v, format=fmt), kv_lens, tables, cu_q_lens


def step_time(native_decode: bool, q, kv, kv_lens, tables, cu_q_lens, repeats: int) -> float:
    @jax.jit
    def all_layers(q, kv, kv_lens, tables, cu_q_lens):
        plan = plan_attention(kv_lens, tables, cu_q_lens, jnp.int32(q.shape[0]), q.shape[0])

        def layer(acc, i):
            return acc + attend(q, kv, i, plan, sm_scale=HEAD_DIM ** -0.5, native_decode=native_decode), None

        return jax.lax.scan(layer, jnp.zeros_like(q), jnp.arange(LAYERS))[0]

    args = (q, kv, kv_lens, tables, cu_q_lens)
    all_layers(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        all_layers(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--contexts", default="192,1024")
    ap.add_argument("--formats", default="float32,bfloat16,int8")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    packed = [f for f in args.formats.split(",") if FORMATS[f].packed]
    if packed:
        ap.error(f"the native kernel reads unpacked pages only; drop {', '.join(packed)} (4-bit pages run on XLA)")

    rows = []
    print(f"{args.batch} single-token queries, {LAYERS} layers, SmolLM2-135M heads; median of {args.repeats}")
    print(f"{'format':<10}{'context':>8}{'KV MB':>8}{'XLA ms':>9}{'native ms':>11}{'speedup':>9}{'native GB/s':>13}")
    for fmt in args.formats.split(","):
        for context in map(int, args.contexts.split(",")):
            batch = make_batch(fmt, args.batch, context)
            kv_bytes = 2 * args.batch * context * LAYERS * KV_HEADS * HEAD_DIM * batch[1].k.dtype.itemsize
            xla = step_time(False, *batch, args.repeats)
            nat = step_time(True, *batch, args.repeats)
            rows.append({"format": fmt, "context": context, "kv_bytes": kv_bytes, "xla_s": xla, "native_s": nat,
                         "speedup": xla / nat})
            print(f"{fmt:<10}{context:>8}{kv_bytes / 1e6:>8.0f}{xla * 1e3:>9.1f}{nat * 1e3:>11.1f}"
                  f"{xla / nat:>9.2f}{kv_bytes / nat / 1e9:>13.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": platform.machine(), "processor": platform.processor(),
                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
