"""`jaxserve` command line: generate | convert. Bad input ends in one line on stderr and exit 1."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jaxserve.errors import JaxServeError


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text for one or more prompts")
    p.add_argument("--model", default="smollm2-135m", help="a known name (smollm2-135m) or a checkpoint path")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", "finish_reason"} per prompt')
    p.set_defaults(run=_run_generate)


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert a safetensors dir or GGUF file into a jaxserve orbax checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(run=_run_convert)


def _enable_compilation_cache():
    """Reuse compiled step functions across runs (start-up compiles every shape bucket)."""
    import jax

    from jaxserve.checkpoint.registry import cache_dir

    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _run_generate(args):
    from jaxserve import LLM, SamplingParams  # jax is imported only once arguments are known good

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    _enable_compilation_cache()
    llm = LLM(args.model, dtype=args.dtype)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for out in outputs:
        if args.json:
            print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
        else:
            print(out.text)


def _run_convert(args):
    from jaxserve.checkpoint import convert

    print(f"converted into {convert(args.src, args.dst, dtype=args.dtype)}")


def main(argv=None) -> int:
    parser = _OneLineParser(prog="jaxserve", description="JAX/XLA LLM inference runtime")
    parser.add_argument("--log-level", default=os.environ.get("JAXSERVE_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    _add_generate(sub)
    _add_convert(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (JaxServeError, ValueError) as e:  # TokenizerError and argument errors are ValueErrors
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxserve: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
