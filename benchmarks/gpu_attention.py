"""Decode attention on a GPU: our Pallas ragged paged attention kernel (pallas_kernels/
ragged_paged_attention/gpu.py) against jax's own Pallas paged_attention, on the same shapes.

Per shape: median time of our kernel in each KV format, the HBM bandwidth it achieves (bytes of the
KV pages the sequences use + q + out, over time) and its fraction of the measured copy bandwidth,
and the speedup over jax's kernel on the same shape in bfloat16 (its layout [kv_heads, pages,
page_size, head_dim]; the same data is transposed into it outside the timed region).

    python benchmarks/gpu_attention.py --json benchmarks/gpu_attention_h100.json     # on a GPU
    python benchmarks/gpu_attention.py --interpret                                   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

from pallas_kernels.kv_quant import FORMATS, KVPages, bytes_per_page
from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu

MODELS = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}  # q heads, kv heads, head dim
PAGE = 16
ROTATE_BYTES = 256 << 20  # rotate among cache copies until this much: L2 (50 MB) must not help


def timeit(fn, datas, q, chain: int, repeats: int = 5) -> float:
    """Device seconds per call of fn(q, data): `chain` calls unrolled in one jit, each call's query
    depending on the last output (so none is skipped or overlapped), cycling through `datas` (cache
    copies, so L2 does not serve them); median over `repeats`. Host dispatch stays out."""
    @jax.jit
    def run(q, datas):
        for i in range(chain):
            q = q + (fn(q, datas[i % len(datas)]) * 1e-30).astype(q.dtype)
        return q

    jax.block_until_ready(run(q, datas))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(q, datas))
        times.append((time.perf_counter() - t0) / chain)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """Bytes read + written per second of an elementwise pass over a large array."""
    f = jax.jit(lambda a: a + 1)  # one call per pass: chained in one jit, XLA would fuse the passes
    x = jax.block_until_ready(f(jnp.ones((nbytes // 2,), jnp.bfloat16)))
    t0 = time.perf_counter()
    for _ in range(iters):
        x = f(x)
    jax.block_until_ready(x)
    return 2 * nbytes * iters / (time.perf_counter() - t0)


def _float_codes(x, f):
    """bfloat16 / fp8 page codes (their bits) of x."""
    return jax.lax.bitcast_convert_type(x.astype(f.bits_of), f.codes_dtype)


def random_pages(key, fmt, num_pages: int, kvh: int, d: int) -> KVPages:
    """One layer of random pages in `fmt` (finite codes and positive scales)."""
    f = FORMATS[fmt]
    shape = (1, num_pages, PAGE, kvh, d // 2 if f.packed else d)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)

    def codes(k):
        if f.packed:
            return jax.random.bits(k, shape, jnp.uint8).view(f.codes_dtype)
        if fmt == "int8":
            return jax.random.randint(k, shape, -127, 128, jnp.int32).astype(jnp.int8)
        scale = 100.0 if fmt == "fp8" else 1.0
        x = jax.random.normal(k, shape, jnp.float32) * scale
        return x if fmt == "float32" else _float_codes(x, f)

    def scales(k):
        if f.group is None:
            return None
        top = 1.0 if fmt == "int4" else 8.0
        s = jax.random.uniform(k, shape[:-1] + (d // f.group,), jnp.float32, 0.01, top).astype(f.scale_bits_of)
        return jax.lax.bitcast_convert_type(s, f.scale_dtype)

    chan = (jax.random.uniform(k5, (1, kvh, d), jnp.float32, 0.001, 0.01) if f.quantized else None)
    return KVPages(codes(k1), codes(k2), scales(k3), scales(k4), chan, chan, format=f)


def case_inputs(seed: int, model: str, batch: int, ctx: int):
    """Decode batch: every sequence ctx tokens long, one query token each, pages scattered."""
    h, _kvh, d = MODELS[model]
    rng = np.random.default_rng(seed)
    per_seq = -(-ctx // PAGE)
    num_pages = batch * per_seq + 1
    tables = (rng.permutation(num_pages - 1)[: batch * per_seq] + 1).reshape(batch, per_seq).astype(np.int32)
    q = jax.random.normal(jax.random.PRNGKey(seed), (batch, h, d), jnp.float32).astype(jnp.bfloat16)
    meta = (jnp.full((batch,), ctx, jnp.int32), jnp.asarray(tables), jnp.arange(batch + 1, dtype=jnp.int32),
            jnp.asarray([batch], jnp.int32))
    return q, num_pages, meta


def parse_configs(text: str) -> list[dict]:
    """'pages_per_block=8,num_warps=8;num_kv_splits=4' -> tuning kwarg dicts ('' = the defaults)."""
    return [{k: int(v) for k, v in (kv.split("=") for kv in c.split(",") if kv)} for c in text.split(";")]


def run_shape(model: str, batch: int, ctx: int, formats, configs, args) -> list[dict]:
    _h, kvh, d = MODELS[model]
    q, num_pages, (lens, tables, cu, nseq) = case_inputs(0, model, batch, ctx)
    sm_scale = d ** -0.5
    pages_read = batch * -(-ctx // PAGE)
    io_bytes = 2 * q.size * q.dtype.itemsize  # q in, out back
    jax_time = agree = None
    rows = []
    for fmt in formats:
        page_bytes = bytes_per_page(FORMATS[fmt], 1, PAGE, kvh, d)
        copies = max(1, min(args.max_copies, ROTATE_BYTES // (num_pages * page_bytes)))
        kvs = [random_pages(jax.random.PRNGKey(i), fmt, num_pages, kvh, d) for i in range(copies)]
        if fmt == "bfloat16" and not args.skip_jax:
            # jax's kernel: [kv_heads, pages, page_size, head_dim] layout, converted outside the timing
            def ref(q, data):
                return paged_attention(q * sm_scale, *data, interpret=args.interpret, k_splits=min(16, tables.shape[1]))
            ref_data = [(kv.k[0].transpose(2, 0, 1, 3), kv.v[0].transpose(2, 0, 1, 3), tables, lens) for kv in kvs]
            jax_time = timeit(ref, ref_data, q, args.iters)
            ref_out = jax.jit(ref)(q, ref_data[0]).astype(jnp.float32)
            del ref_data
        for cfg in configs:
            def ours(q, kv, cfg=cfg):
                return ragged_paged_attention_gpu(q, kv, jnp.int32(0), lens, tables, cu, nseq, sm_scale=sm_scale,
                                                  interpret=args.interpret, **cfg)
            t = timeit(ours, kvs, q, args.iters)
            if fmt == "bfloat16" and not args.skip_jax:
                agree = float(jnp.max(jnp.abs(jax.jit(ours)(q, kvs[0]).astype(jnp.float32) - ref_out)))
            nbytes = pages_read * page_bytes + io_bytes
            rows.append({"model": model, "batch": batch, "ctx": ctx, "format": fmt, "config": cfg, "us": t * 1e6,
                             "gbps": nbytes / t / 1e9, "frac_copy": nbytes / t / args.copy_bw,
                             "jax_bf16_us": None if jax_time is None else jax_time * 1e6,
                             "speedup_vs_jax_bf16": None if jax_time is None else jax_time / t,
                             "max_abs_diff_vs_jax": agree if fmt == "bfloat16" else None})
            print_row(rows[-1])
        del kvs
    return rows


def print_row(r: dict):
    jax_us = "-" if r["jax_bf16_us"] is None else f"{r['jax_bf16_us']:9.1f}"
    speed = "-" if r["speedup_vs_jax_bf16"] is None else f"{r['speedup_vs_jax_bf16']:5.2f}x"
    cfg = ",".join(f"{k}={v}" for k, v in r["config"].items()) or "default"
    print(f"{r['model']:8s} {r['batch']:5d} {r['ctx']:6d} {r['format']:9s} {r['us']:9.1f} {r['gbps']:8.1f} "
          f"{r['frac_copy']:6.2f} {jax_us:>9s} {speed:>7s}  {cfg}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,llama8b")
    p.add_argument("--batches", default="8,32,128")
    p.add_argument("--contexts", default="512,2048,8192")
    p.add_argument("--formats", default="bfloat16,fp8,int8,int4,nvfp4")
    p.add_argument("--configs", default="", help="tuning kwargs to compare, e.g. 'pages_per_block=8;num_warps=8'")
    p.add_argument("--iters", type=int, default=8, help="calls chained in one timed jit")
    p.add_argument("--max-copies", type=int, default=8)
    p.add_argument("--skip-jax", action="store_true")
    p.add_argument("--interpret", action="store_true", help="CPU smoke run on tiny shapes")
    p.add_argument("--json")
    args = p.parse_args()
    if args.interpret:  # tiny shapes, few iterations: checks that everything runs, times mean nothing
        args.batches, args.contexts, args.iters, args.max_copies = "2", "256", 1, 1
    args.copy_bw = copy_bandwidth((16 << 20) if args.interpret else (2 << 30), args.iters)
    print(f"device: {jax.devices()[0].device_kind}; copy bandwidth {args.copy_bw / 1e9:.0f} GB/s (read + write)")
    print(f"{'model':8s} {'batch':>5s} {'ctx':>6s} {'format':9s} {'us':>9s} {'GB/s':>8s} {'frac':>6s} "
          f"{'jax_us':>9s} {'speedup':>7s}  config")
    rows = []
    for model in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            for ctx in map(int, args.contexts.split(",")):
                rows += run_shape(model, batch, ctx, args.formats.split(","), parse_configs(args.configs), args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "copy_gbps": args.copy_bw / 1e9,
                           "page_size": PAGE, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
