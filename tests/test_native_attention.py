"""The native CPU decode kernel (jaxserve/ops/native): built with the machine's g++, it gives the
reference's attention on every page format it reads, rejects bad page tables instead of reading
past the cache, and the engine on it produces the XLA path's tokens."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.checkpoint import load_model
from jaxserve.engine import Engine, EngineConfig
from jaxserve.ops import native
from jaxserve.ops.attention import plan_attention, ragged_paged_attention_xla
from engine_runs import run_batch
from rpa_cases import TOLERANCE, batch_params, make_case, reference
from tiny_models import make_hf_model, save_safetensors

UNPACKED = ["float32", "bfloat16", "fp8", "int8"]  # 4-bit pages stay on the XLA path
_native = jax.jit(ragged_paged_attention_xla, static_argnames=("sm_scale", "sliding_window", "soft_cap", "native_decode"))


def test_the_kernel_builds_here():
    assert native.available()  # g++ is part of the machine; CI must exercise the kernel, not fall back


@pytest.mark.parametrize("name", UNPACKED)
@pytest.mark.parametrize("batch", batch_params(quick=("decode", "mixed")))
def test_matches_reference(name, batch):
    _, q_lens, kv_lens = batch
    case = make_case(5, name, q_lens, kv_lens)
    want = reference(case, sm_scale=0.125)
    got = _native(*case.args(), sm_scale=0.125, native_decode=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOLERANCE[name], rtol=TOLERANCE[name])


@pytest.mark.parametrize("opts", [dict(sliding_window=7), dict(soft_cap=5.0), dict(sliding_window=20, soft_cap=20.0)])
def test_window_and_soft_cap(opts):
    """GQA 8, head_dim 128, page size 32; decodes on and past page edges."""
    case = make_case(6, "bfloat16", [1, 1, 1, 20], [32, 33, 65, 20], page_size=32, head_dim=128, heads=8, kv_heads=1)
    want = reference(case, sm_scale=0.1, **opts)
    got = _native(*case.args(), sm_scale=0.1, native_decode=True, **opts)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_only_decode_rows_are_written():
    case = make_case(7, "float32", [1, 5, 1], [9, 5, 30], pad_tokens=4)
    plan = plan_attention(*(jnp.asarray(a) for a in (case.kv_lens, case.page_tables, case.cu_q_lens)),
                          jnp.int32(case.num_seqs[0]), case.q.shape[0])
    qg = jnp.asarray(np.random.default_rng(0).standard_normal((case.q.shape[0], 2, 3, 64)), jnp.float32)
    out = np.asarray(native.decode_attention(qg, case.kv.k, case.kv.v, 1, plan.token_tables, plan.position,
                                             plan.decode_ids, plan.num_decode, sliding_window=None, soft_cap=None))
    written = np.abs(out).sum(axis=(1, 2, 3)) > 0
    assert written.tolist() == [True, False, False, False, False, False, True, False, False, False, False]


def test_bad_page_ids_are_an_error_not_a_wild_read():
    case = make_case(8, "float32", [1, 1], [10, 40])
    tables = case.page_tables.copy()
    tables[1, 2] = 10_000  # far past the cache
    with pytest.raises(Exception, match="page id out of range"):
        _native(case.q, case.kv, case.layer, case.kv_lens, tables, case.cu_q_lens, case.num_seqs,
                sm_scale=0.125, native_decode=True).block_until_ready()


def test_turned_off_falls_back_to_xla_and_explicit_choice_says_why():
    code = ("from jaxserve.ops.backends import select_attention_backend as r\n"
            "print(r('auto', platform='cpu').name)\n"
            "try:\n    r('native', platform='cpu')\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAXSERVE_NATIVE": "0"}).stdout.splitlines()
    assert out == ["xla", "attention backend 'native' is unavailable: turned off by JAXSERVE_NATIVE=0"]


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return load_model(save_safetensors(make_hf_model("qwen2", seed=7), tmp_path_factory.mktemp("tiny")),
                      dtype="float32", progress=False)


@pytest.mark.slow
def test_engine_tokens_match_the_xla_path(tiny_qwen2):
    """Mixed prefill/decode steps, bfloat16 and int8 pages: the same greedy tokens either way."""
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, tiny_qwen2.config.vocab_size, n).tolist() for n in (1, 17, 40, 70)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for kv_dtype in ("bfloat16", "int8"):
        outputs = {}
        for backend in ("xla", "native"):
            engine = Engine(tiny_qwen2, EngineConfig(num_pages=32, max_num_seqs=4, max_num_batched_tokens=32,
                                                     kv_cache_dtype=kv_dtype, attention_backend=backend))
            assert engine.info().attention_backend == backend
            outputs[backend] = run_batch(engine, prompts, params)
        assert outputs["native"] == outputs["xla"]
        assert all(len(t) == 8 for t in outputs["xla"])
