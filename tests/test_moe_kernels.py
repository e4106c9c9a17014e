"""The grouped matmul kernels against the ragged_dot reference: the Mosaic TPU kernel under the TPU
interpreter, the GPU kernel under Pallas' interpreter (compiled with Triton where jax sees a GPU),
and the visit schedule both walk. Shapes and tiles are tiny so that every case still spans several
row, K and N tiles; both interpreters fill unwritten output with NaN, so a row no visit wrote
fails the comparison."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice, AbstractMesh
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.moe import gmm_gpu, gmm_reference, gmm_tpu, make_group_metadata
from pallas_kernels.moe.common import num_visits

GPU_INTERPRET = jax.default_backend() != "gpu"
TPU_TILING = (8, 16, 16)  # (tm, tk, tn)
GPU_BLOCKS = {"block_m": 16, "block_n": 16, "block_k": 16}  # Triton's smallest dot

# Both dtypes accumulate in float32 and are compared with a float32 reference of the same inputs
# (bfloat16 ones upcast), so only the order of summation differs: K <= 64 terms of size ~1 leave
# ~1e-6. bfloat16 gets no looser bound, because a product of two bfloat16 values (8 significant
# bits each) is exact in float32: a kernel that rounded anything to bfloat16 would miss by ~1e-2.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-5}

# name: (group_sizes, M, K, N)
CASES = {
    "uneven": ([5, 17, 2, 9, 11], 44, 24, 40),              # M, K, N not multiples of any tile
    "empty-experts": ([0, 6, 0, 0, 10, 7, 0], 23, 16, 16),  # first, last and middle groups empty
    "one-expert": ([0, 0, 32, 0], 32, 32, 16),              # every row to one expert
    "trailing-rows": ([3, 4, 0, 5], 40, 16, 24),            # sum 12 < M: rows 12.. and whole tiles zero
    "straddle": ([2, 3, 1, 4, 2, 12], 24, 64, 32),          # tile 0 holds 4 (tm 8) / 6 (bm 16) groups
    "no-rows": ([0, 0, 0], 16, 16, 16),                     # nothing routed: all zeros
}


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """A kernel that raises leaves the TPU interpreter's shared state behind; clear it."""
    yield
    pltpu.reset_tpu_interpret_mode_state()


def _operands(name: str, dtype, seed: int = 0):
    sizes, m, k, n = CASES[name]
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _check(out, lhs, rhs, sizes):
    want = gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    assert out.shape == want.shape and out.dtype == jnp.float32
    tol = TOLERANCE[lhs.dtype.type]
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=tol, rtol=tol)
    assert not np.asarray(out)[int(np.sum(sizes)):].any(), "rows past the total must be zeros"


@functools.cache
def _tpu(**kw):
    return jax.jit(functools.partial(gmm_tpu, interpret=pltpu.InterpretParams(), **kw))


@functools.cache
def _gpu(**kw):
    return jax.jit(functools.partial(gmm_gpu, interpret=GPU_INTERPRET, **kw))


DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_tpu_matches_reference(name, dtype):
    lhs, rhs, sizes = _operands(name, dtype)
    _check(_tpu(tiling=TPU_TILING)(lhs, rhs, sizes), lhs, rhs, sizes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_matches_reference(name, dtype):
    lhs, rhs, sizes = _operands(name, dtype)
    _check(_gpu(**GPU_BLOCKS)(lhs, rhs, sizes), lhs, rhs, sizes)


def test_default_tiles():
    """The default tiles clipped to a small shape: one row tile, one K and N block."""
    lhs, rhs, sizes = _operands("uneven", jnp.bfloat16)
    _check(_tpu()(lhs, rhs, sizes), lhs, rhs, sizes)
    _check(_gpu()(lhs, rhs, sizes), lhs, rhs, sizes)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_traced_group_sizes_one_compilation(kernel):
    """As a MoE layer calls it: inside jit with the group sizes traced; new routing of the same
    shapes reuses the one compiled program."""
    run = _tpu(tiling=TPU_TILING) if kernel == "tpu" else _gpu(**GPU_BLOCKS)
    lhs, rhs, _ = _operands("uneven", jnp.float32)
    routings = ([5, 17, 2, 9, 11], [0, 0, 44, 0, 0], [9, 0, 1, 0, 3])
    before = run._cache_size()  # `run` is shared: other tests may have compiled these shapes
    for sizes in routings:
        sizes = jnp.asarray(sizes, jnp.int32)
        _check(run(lhs, rhs, sizes), lhs, rhs, sizes)
    assert run._cache_size() - before <= 1


def test_schedule_example():
    """Groups [0, 5, 3, 0, 9, 1, 0] over 40 rows in tiles of 8: tile 0 holds groups 1 and 2, tile 2
    groups 4 and 5, tiles 3 and 4 lie past the total (18) and get one zero-fill visit each."""
    meta = jax.jit(make_group_metadata, static_argnums=(1, 2))(jnp.asarray([0, 5, 3, 0, 9, 1, 0]), 40, 8)
    assert len(meta.tile) == num_visits(40, 7, 8) == 11
    assert np.asarray(meta.tile).tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 4]
    assert np.asarray(meta.group)[:5].tolist() == [1, 2, 4, 4, 5]
    assert np.asarray(meta.lo)[:5].tolist() == [0, 5, 8, 8, 17]
    assert np.asarray(meta.hi)[:5].tolist() == [5, 8, 17, 17, 18]
    assert not np.asarray(meta.hi - meta.lo)[5:].any()  # zero-fill and padding: no rows
    assert np.asarray(meta.first).tolist() == [1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    assert np.asarray(meta.fetch_tile)[5:].tolist() == [2] * 6  # nothing new to fetch
    assert int(meta.total[0]) == 18


def test_schedule_covers_every_row_once():
    """Random routings (many empty groups): every owned row is in exactly one active visit of its
    own group and tile, every tile has one first visit, and visits come in tile order."""
    m, g, tm = 37, 9, 8
    build = jax.jit(lambda sizes: make_group_metadata(sizes, m, tm))
    rng = np.random.default_rng(1)
    for _ in range(100):
        sizes = rng.multinomial(rng.integers(0, m + 1), rng.dirichlet(np.full(g, 0.3)))
        meta = jax.tree.map(np.asarray, build(jnp.asarray(sizes, jnp.int32)))
        assert (np.diff(meta.tile) >= 0).all() and (meta.first.sum() == -(-m // tm))
        owner = np.repeat(np.arange(g), sizes)  # [total] group of each row
        hits = np.zeros(m, int)
        for t, grp, lo, hi in zip(meta.tile, meta.group, meta.lo, meta.hi):
            rows = np.arange(max(lo, t * tm), min(hi, (t + 1) * tm))
            assert (owner[rows] == grp).all()
            hits[rows] += 1
        assert (hits[: sizes.sum()] == 1).all() and not hits[sizes.sum():].any()


def _lower(fn, platform: str, dtype):
    shapes = (jax.ShapeDtypeStruct((200, 256), dtype), jax.ShapeDtypeStruct((8, 256, 384), dtype),
              jax.ShapeDtypeStruct((8,), jnp.int32))
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("dtype", DTYPES)
def test_tpu_lowers_to_mosaic(dtype):
    """Interpretation skips Mosaic lowering, so also lower (no compile: that needs a TPU) with the
    default tiles for a TPU v6e described by an abstract mesh."""
    tpu = AbstractDevice(device_kind="TPU v6 lite", num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=tpu)):
        assert "tpu_custom_call" in _lower(gmm_tpu, "tpu", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_lowers_to_triton(dtype):
    """Likewise the Triton lowering of the GPU kernel with its default blocks (no compile)."""
    assert "triton" in _lower(gmm_gpu, "cuda", dtype).lower()
