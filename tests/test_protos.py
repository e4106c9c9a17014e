"""The generated gRPC code in jaxserve/v1 must match protos/ (regenerate: python scripts/gen_protos.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "jaxserve" / "v1").iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in (ROOT / "jaxserve" / "v1").iterdir() if p.is_file()}
    assert set(fresh) == set(committed), "generated files differ: run python scripts/gen_protos.py"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale generated code {stale}: run python scripts/gen_protos.py"


def test_service_is_versioned():
    from jaxserve.v1 import jaxserve_pb2 as pb

    assert pb.DESCRIPTOR.package == "jaxserve.v1"
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["JaxServe"].methods}
    assert methods == {"Generate", "Tokenize", "Detokenize", "GetModelInfo", "GetServerInfo", "Abort"}
