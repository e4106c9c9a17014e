"""`jaxserve serve` (the gRPC server on a device mesh) and `jaxserve request` (one streamed request
to a running server). Heavy imports (jax, grpc) wait until the arguments are known good."""
from __future__ import annotations

import json
import sys


def add_serve(sub, add_engine_options):
    p = sub.add_parser("serve", help="serve the jaxserve.v1 gRPC API")
    p.add_argument("--model", default="smollm2-135m", help="a known name (smollm2-135m) or a checkpoint path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics on this port (off if unset)")
    p.add_argument("--mesh", default=None, help="devices to use: tp=N[,dp=M] (tensor parallel x replicas)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="running requests per replica")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="waiting requests beyond the running batch before RESOURCE_EXHAUSTED")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    add_engine_options(p)
    p.set_defaults(run=run_serve)


def add_request(sub, add_sampling_options):
    p = sub.add_parser("request", help="send one request to a running server and stream the answer")
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of `jaxserve serve`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    add_sampling_options(p)
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object with the whole result instead")
    p.set_defaults(run=run_request)


def _check_positive(**values):
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def run_serve(args):
    from jaxserve.cli import _enable_compilation_cache, _engine_options

    _check_positive(port=args.port, metrics_port=args.metrics_port, max_num_seqs=args.max_num_seqs,
                    max_model_len=args.max_model_len, drain_timeout=args.drain_timeout)
    if args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    from jaxserve.parallel import parse_mesh

    parse_mesh(args.mesh)  # fail on bad --mesh before loading anything
    import asyncio

    from jaxserve.engine.engine import EngineConfig
    from jaxserve.server import ServerConfig, serve, start_engines

    _enable_compilation_cache()
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, **_engine_options(args))
    pool, info = start_engines(args.model, args.dtype, config, args.mesh, args.max_queued_requests)
    server_config = ServerConfig(host=args.host, port=args.port, metrics_port=args.metrics_port,
                                 max_queued_requests=args.max_queued_requests, drain_timeout=args.drain_timeout)
    try:
        asyncio.run(serve(pool, info, server_config))
    finally:
        pool.shutdown()


def run_request(args):
    from jaxserve.cli import _sampling_options
    from jaxserve.client import Client, Result

    kwargs = dict(timeout=args.timeout, **_sampling_options(args))
    if args.chat:
        kwargs["messages"] = [{"role": "user", "content": args.prompt}]
    prompt = None if args.chat else args.prompt
    with Client(args.server) as client:
        result = Result()
        for delta in client.stream(prompt, **kwargs):
            result.add(delta)
            if not args.json:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "usage": vars(result.usage) if result.usage else None}))
    else:
        sys.stdout.write("\n")
