"""`jaxserve convert`: a safetensors dir or GGUF file into a jaxserve orbax checkpoint."""
from __future__ import annotations


def add(sub, formatter):
    p = sub.add_parser("convert", help="convert a safetensors dir or GGUF file into a jaxserve orbax checkpoint",
                       formatter_class=formatter)
    p.add_argument("src", help="HF safetensors directory or .gguf file")
    p.add_argument("dst", help="the new checkpoint directory (must not exist)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype to store")
    p.set_defaults(run=run)


def run(args):
    from jaxserve.checkpoint import convert

    print(f"converted into {convert(args.src, args.dst, dtype=args.dtype)}")
