"""The layers stay apart: host bookkeeping never imports jax, the client and the client-side CLI never
import jax or engine code, and nothing outside the engine package reaches the scheduler, the block
manager or the runner (by import or by attribute)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxserve"
ENGINE_INTERNALS = ("jaxserve.core.scheduler", "jaxserve.core.block_manager", "jaxserve.runner")
# Packages that build the engine out of its parts (the engine) or are those parts.
MAY_USE_INTERNALS = ("engine", "core", "runner")
INTERNAL_ATTRIBUTES = {"scheduler", "block_manager", "runner"}
# What an Engine holds besides its interface: read outside the package only through info()/stats().
ENGINE_HOLDINGS = {"model", "kv_format", "backend", "mesh", "config"}
HEAVY = ("jax", "jaxlib", "flax", "orbax", "jaxserve.engine", "jaxserve.core", "jaxserve.runner", "jaxserve.models",
         "jaxserve.parallel", "jaxserve.checkpoint")
# The command line reads option names (KV formats, attention backends) from these two jax-free modules.
CLI_OPTION_MODULES = {"jaxserve.ops", "jaxserve.ops.backends", "pallas_kernels", "pallas_kernels.kv_formats"}


def imported_modules(command: list[str]) -> set[str]:
    """Every module the command imports, from `python -X importtime`."""
    out = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}


def heavy(modules: set[str], heavy_prefixes=HEAVY) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy_prefixes))


@pytest.mark.parametrize("command", [
    ["-c", "import jaxserve.client"],
    ["-m", "jaxserve.cli", "--help"],
    ["-m", "jaxserve.cli", "request", "--help"],
    ["-m", "jaxserve.cli", "serve", "--help"],
], ids=["import jaxserve.client", "jaxserve --help", "jaxserve request --help", "jaxserve serve --help"])
def test_client_side_imports_no_jax_and_no_engine(command):
    modules = imported_modules(command)
    assert "jaxserve.client" in modules or "jaxserve.cli" in modules  # it really ran
    assert heavy(modules) == []
    if "-m" not in command:  # the client library: not even option tables, only grpc and the protos
        assert heavy(modules, ("jaxserve.ops", "pallas_kernels", "numpy")) == []
    else:
        assert {m for m in modules if m.startswith(("jaxserve.ops", "pallas_kernels"))} <= CLI_OPTION_MODULES


def test_host_bookkeeping_imports_no_jax():
    modules = imported_modules(["-c", "import jaxserve.core.scheduler, jaxserve.core.plan, jaxserve.engine.outputs, "
                                      "jaxserve.engine.config"])
    assert "jaxserve.core.scheduler" in modules
    assert [m for m in modules if m in ("jax", "jaxlib") or m.startswith(("jax.", "jaxlib."))] == []


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield ".".join(rel.parts), ast.parse(path.read_text(), str(path))


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_nothing_outside_the_engine_reaches_its_internals():
    offenders = []
    for module, tree in _modules():
        if module.split(".")[1] in MAY_USE_INTERNALS:
            continue
        for name in _imports(tree):
            if any(name == p or name.startswith(p + ".") for p in ENGINE_INTERNALS):
                offenders.append(f"{module} imports {name}")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            on_engine = ast.unparse(node.value).split(".")[-1].endswith("engine")
            if node.attr in INTERNAL_ATTRIBUTES or (on_engine and node.attr in ENGINE_HOLDINGS):
                offenders.append(f"{module}:{node.lineno} reads {ast.unparse(node)}")
    assert offenders == []


def test_the_scan_sees_the_package():
    modules = dict(_modules())
    assert {"jaxserve.server.service", "jaxserve.llm", "jaxserve.core.scheduler", "jaxserve.engine.engine"} <= set(modules)
    # and would catch an offender: the engine itself reads its scheduler
    assert "jaxserve.core.scheduler" in _imports(modules["jaxserve.engine.engine"])
