"""`jaxserve` command line: generate | perplexity | convert | serve | request.
Bad input ends in one line on stderr and exit 1."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from jaxserve import cli_server
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
    _add_sampling_options(p)
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", "finish_reason"} per prompt')
    _add_engine_options(p)
    p.set_defaults(run=_run_generate)


def _add_sampling_options(p):
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    p.add_argument("--ignore-eos", action="store_true")


def _sampling_options(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _add_engine_options(p):
    from pallas_kernels.kv_quant import KV_CACHE_DTYPES  # no jax import: plain metadata
    from jaxserve.ops.backends import ATTENTION_BACKENDS

    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="format of the KV pages (auto: the model dtype)")
    p.add_argument("--kv-cache-memory", type=_size, default=None, help="bytes for KV pages, e.g. 2G (default 1G)")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="auto: the platform's Pallas kernel on TPU/GPU, the native C++ decode kernel "
                        "(else XLA) on CPU")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step (prefill chunk)")


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G or bytes)") from None


def _engine_options(args) -> dict:
    return dict(kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=args.kv_cache_memory,
                attention_backend=args.attention_backend, max_num_batched_tokens=args.max_num_batched_tokens)


def _add_perplexity(sub):
    p = sub.add_parser("perplexity", help="perplexity of a text file, scored through the engine's paged KV cache")
    p.add_argument("--model", default="smollm2-135m", help="a known name (smollm2-135m) or a checkpoint path")
    p.add_argument("--file", required=True, help="UTF-8 text file to score")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window (each scored in budget-sized chunks)")
    p.add_argument("--json", action="store_true", help='print one {"perplexity", "tokens", ...} object')
    _add_engine_options(p)
    p.set_defaults(run=_run_perplexity)


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

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _run_generate(args):
    from jaxserve import LLM, SamplingParams  # jax is imported only once arguments are known good

    params = SamplingParams(**_sampling_options(args))
    _enable_compilation_cache()
    llm = LLM(args.model, dtype=args.dtype, **_engine_options(args))
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for out in outputs:
        if args.json:
            print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
        else:
            print(out.text)


def _run_perplexity(args):
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --file {args.file}: {e}") from None
    from jaxserve import LLM
    from jaxserve.perplexity import perplexity

    _enable_compilation_cache()
    llm = LLM(args.model, dtype=args.dtype, **_engine_options(args))
    if llm.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer, so it cannot score text")
    result = perplexity(llm.engine, llm.tokenizer.encode(text), args.ctx)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
              f"({result.windows} windows of <= {result.context}, KV cache {result.kv_cache_dtype})")


def _run_convert(args):
    from jaxserve.checkpoint import convert

    print(f"converted into {convert(args.src, args.dst, dtype=args.dtype)}")


def _configure_logging(explicit: str | None, command: str) -> None:
    """--log-level applies to everything; by default jaxserve's own loggers say INFO for serve (a
    server narrates its events) and libraries (jax backend probing, orbax) stay at WARNING."""
    level = (explicit or ("INFO" if command == "serve" else "WARNING")).upper()
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if explicit else "WARNING", format=fmt)
    logging.getLogger("jaxserve").setLevel(level)


def main(argv=None) -> int:
    parser = _OneLineParser(prog="jaxserve", description="JAX/XLA LLM inference runtime")
    parser.add_argument("--log-level", default=os.environ.get("JAXSERVE_LOG_LEVEL"),
                        help="DEBUG | INFO | WARNING (default: INFO for serve, WARNING otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    _add_generate(sub)
    _add_perplexity(sub)
    _add_convert(sub)
    cli_server.add_serve(sub, _add_engine_options)
    cli_server.add_request(sub, _add_sampling_options)
    args = parser.parse_args(argv)
    _configure_logging(args.log_level, args.command)
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
