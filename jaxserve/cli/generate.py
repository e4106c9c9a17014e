"""`jaxserve generate`: text for one or more prompts, offline on the local devices."""
from __future__ import annotations

import json

from jaxserve.cli.options import (DEFAULT_MODEL_HELP, add_engine_options, add_sampling_options, enable_compilation_cache,
                                  engine_options, sampling_options)


def add(sub, formatter):
    p = sub.add_parser("generate", help="generate text for one or more prompts", formatter_class=formatter)
    p.add_argument("--model", default="smollm2-135m", help=DEFAULT_MODEL_HELP)
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    add_sampling_options(p)
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", "finish_reason"} per prompt')
    add_engine_options(p)
    p.set_defaults(run=run)


def run(args):
    from jaxserve import LLM, SamplingParams  # jax is imported only once arguments are known good

    params = SamplingParams(**sampling_options(args))
    enable_compilation_cache()
    llm = LLM(args.model, dtype=args.dtype, **engine_options(args))
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for out in outputs:
        if args.json:
            print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
        else:
            print(out.text)
