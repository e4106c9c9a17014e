"""Generates the Python gRPC code for protos/jaxserve/v1/*.proto into jaxserve/v1/.

    python scripts/gen_protos.py            # regenerate in place
    python scripts/gen_protos.py --out DIR  # write the tree under DIR instead (the staleness test)

Needs grpcio-tools (a test dependency). The generated modules import each other as
`jaxserve.v1.*`, which is where they land inside the jaxserve package.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("jaxserve") / "v1"
INIT = '"""Generated gRPC code for protos/jaxserve/v1 (scripts/gen_protos.py); do not edit."""\n'


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Runs protoc over every proto; returns the files written under `out`."""
    from grpc_tools import protoc  # imported here: only this script needs grpcio-tools

    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    for proto in proto_files():
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", str(proto.relative_to(PROTO_ROOT))]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    (out / PACKAGE / "__init__.py").write_text(INIT)
    return sorted(p for p in (out / PACKAGE).iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write jaxserve/v1/ under")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
