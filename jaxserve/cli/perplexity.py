"""`jaxserve perplexity`: perplexity of a text file, scored through the engine's paged KV cache."""
from __future__ import annotations

import dataclasses
import json

from jaxserve.cli.options import DEFAULT_MODEL_HELP, add_engine_options, enable_compilation_cache, engine_options


def add(sub, formatter):
    p = sub.add_parser("perplexity", help="perplexity of a text file, scored through the engine's paged KV cache",
                       formatter_class=formatter)
    p.add_argument("--model", default="smollm2-135m", help=DEFAULT_MODEL_HELP)
    p.add_argument("--file", required=True, help="UTF-8 text file to score")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window (each scored in budget-sized chunks)")
    p.add_argument("--json", action="store_true", help='print one {"perplexity", "tokens", ...} object')
    add_engine_options(p)
    p.set_defaults(run=run)


def run(args):
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --file {args.file}: {e}") from None
    from jaxserve import LLM
    from jaxserve.perplexity import perplexity

    enable_compilation_cache()
    llm = LLM(args.model, dtype=args.dtype, **engine_options(args))
    if llm.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer, so it cannot score text")
    result = perplexity(llm.engine, llm.tokenizer.encode(text), args.ctx)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
              f"({result.windows} windows of <= {result.context}, KV cache {result.kv_cache_dtype})")
