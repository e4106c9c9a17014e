"""`jaxserve request`: one streamed request to a running server. A pure client: it imports grpc and
the generated protos, never jax or the engine."""
from __future__ import annotations

import json
import sys

from jaxserve.cli.options import add_sampling_options, sampling_options


def add(sub, formatter):
    p = sub.add_parser("request", help="send one request to a running server and stream the answer",
                       formatter_class=formatter)
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of `jaxserve serve`")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    add_sampling_options(p)
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the whole result instead")
    p.set_defaults(run=run)


def run(args):
    from jaxserve.client import Client, Result

    kwargs = dict(timeout=args.timeout, **sampling_options(args))
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
