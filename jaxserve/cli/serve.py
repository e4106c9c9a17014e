"""`jaxserve serve`: the jaxserve.v1 gRPC API over engines on a device mesh. Heavy imports (jax,
grpc) wait until the arguments are known good."""
from __future__ import annotations

from jaxserve.cli.options import DEFAULT_MODEL_HELP, add_engine_options, enable_compilation_cache, engine_options


def add(sub, formatter):
    p = sub.add_parser("serve", help="serve the jaxserve.v1 gRPC API", formatter_class=formatter)
    p.add_argument("--model", default="smollm2-135m", help=DEFAULT_MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics on this port (off if unset)")
    p.add_argument("--mesh", default=None, help="devices to use: tp=N[,ep=E][,dp=M] (tensor parallel x expert "
                                                "parallel x replicas; ep splits MoE experts only, not "
                                                "attention or KV pages; default: one device)")
    p.add_argument("--role", default="colocated", choices=["colocated", "prefill", "decode"],
                   help="disaggregated serving across processes: a prefill server runs prompts for decode "
                        "servers; a decode server (the address clients use) sends prompts to --prefill-servers "
                        "and pulls their KV pages")
    p.add_argument("--prefill-servers", default="",
                   help="decode role: HOST:PORT[,HOST:PORT...] of the prefill servers (when none answers, the "
                        "decode server prefills itself)")
    p.add_argument("--transfer-host", default="127.0.0.1",
                   help="disaggregated roles: the address this server's KV transfer endpoint listens on and "
                        "advertises (one the other side can reach)")
    p.add_argument("--kv-export-lease-timeout", type=float, default=120.0,
                   help="prefill role: seconds exported pages stay pinned when no decode server confirms or "
                        "abandons them")
    p.add_argument("--max-num-seqs", type=int, default=64, help="running requests per replica")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="waiting requests beyond the running batch before RESOURCE_EXHAUSTED")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    add_engine_options(p)
    p.set_defaults(run=run)


def _check_positive(**values):
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def run(args):
    _check_positive(port=args.port, metrics_port=args.metrics_port, max_num_seqs=args.max_num_seqs,
                    max_model_len=args.max_model_len, drain_timeout=args.drain_timeout,
                    kv_export_lease_timeout=args.kv_export_lease_timeout)
    if args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    from jaxserve.parallel.mesh import MeshSpec, parse_deployment

    mesh = parse_deployment(args.mesh)  # the one parse; fails on bad text before loading anything
    servers = tuple(a.strip() for a in args.prefill_servers.split(",") if a.strip())
    if args.role == "decode" and not servers:
        raise ValueError("--role decode needs --prefill-servers HOST:PORT[,...]")
    if args.role != "decode" and servers:
        raise ValueError("--prefill-servers is for --role decode")
    if args.role != "colocated" and not isinstance(mesh, MeshSpec):
        raise ValueError("--role prefill/decode runs one side per process: give it a plain --mesh (tp=N,dp=M)")
    import asyncio

    from jaxserve.engine.config import EngineConfig
    from jaxserve.server import ServerConfig, serve, start_pool

    enable_compilation_cache()
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          kv_export_lease_timeout=args.kv_export_lease_timeout, **engine_options(args))
    pool, info = start_pool(args.model, args.dtype, config, mesh, args.max_queued_requests, role=args.role,
                            prefill_servers=servers, transfer_host=args.transfer_host)
    server_config = ServerConfig(host=args.host, port=args.port, metrics_port=args.metrics_port,
                                 max_queued_requests=args.max_queued_requests, drain_timeout=args.drain_timeout)
    try:
        asyncio.run(serve(pool, info, server_config))
    finally:
        pool.shutdown()
