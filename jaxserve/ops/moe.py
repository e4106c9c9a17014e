"""Mixture-of-experts FFN: the one entry point (`routed_experts`) for routed experts, dropless.

    route     router logits and weights in float32: softmax, top-k, optional renormalization, and
              optional dynamic expert skipping (ModelConfig.moe_min_router_weight / moe_top_p)
    dispatch  the (token, expert) assignments sorted by expert, each expert's rows one group of a
              grouped SwiGLU (gate, up, down), results weighted and summed back per token

No capacity factor and no dropped tokens: a token's result never depends on what else is in the
batch (up to float32 rounding: the matmuls' row counts follow the batch).

The grouped SwiGLU runs where the attention backend says the step runs (decided once, in
jaxserve/ops/backends.py): on CPU (xla, native) in rounds of one batched matmul over all experts,
each taking its next rows (the fastest CPU path: benchmarks/moe.py, RESULTS.md; plain XLA, so it
runs anywhere); on TPU and GPU the Pallas grouped matmul of pallas_kernels/moe.

Expert parallelism: inside `shard_map` every device routes all tokens (activations are replicated
across an engine's devices), keeps the assignments to its own experts, runs them over its slice
of the expert FFN width, and the partial outputs are summed over the split mesh axes (psum). Tokens
never move, which at these batch sizes costs one all-reduce of [tokens, hidden] per layer, the
same as a tensor-parallel dense FFN.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.config import ModelConfig

# CPU rounds (_grouped_swiglu_rounds): rows per expert per round to choose from, and what reading
# every expert's weights once costs, in rows of compute per expert (measured on a Zen 5 host,
# hidden 1024 x FFN 2816 x 8 experts: a round of tm rows took ~7 ms + 0.43 ms x tm). Sizes past 128
# step by 16-32 so a round fits the largest group with little padding.
ROUND_ROWS = (8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256, 320)
WEIGHT_READ_ROWS = 16


def grouped_impl(backend_name: str) -> str:
    """The grouped matmul that runs with an attention backend (ops/backends.py): its Pallas kernels
    with the Pallas attention kernels, the XLA rounds with the XLA / native attention paths.
    ("ragged_dot", jax.lax.ragged_dot, is the reference tests and benchmarks compare with.)"""
    return "rounds" if backend_name in ("xla", "native") else backend_name


def route(x, router_w, cfg: ModelConfig):
    """x [T, D] -> (weights [T, k] float32, experts [T, k] int32). Skipped choices get expert id
    num_experts and weight 0."""
    logits = jnp.matmul(x.astype(jnp.float32), router_w.astype(jnp.float32),   # [T, E]; full float32
                        precision=lax.Precision.HIGHEST)                       # on TPU/GPU too
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = lax.top_k(probs, cfg.num_experts_per_token)             # descending
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if cfg.skips_experts:
        weights, experts = skip_experts(weights, experts, cfg)
    return weights, experts.astype(jnp.int32)


def skip_experts(weights, experts, cfg: ModelConfig):
    """Dynamic expert skipping (see ModelConfig): drops chosen experts per token and rescales the
    kept weights so each token's total weight is unchanged."""
    total = jnp.sum(weights, axis=-1, keepdims=True)
    share = weights / total                                   # renormalized over the chosen k
    keep = share >= cfg.moe_min_router_weight
    keep &= (jnp.cumsum(share, axis=-1) - share) < cfg.moe_top_p
    keep = keep.at[:, 0].set(True)                            # the top expert always runs
    kept = jnp.where(keep, weights, 0.0)
    kept = kept * (total / jnp.sum(kept, axis=-1, keepdims=True))
    return kept, jnp.where(keep, experts, cfg.num_experts)


def dispatch(x, weights, experts, wg, wu, wd, impl: str):
    """Routed experts of one device. x [T, D]; weights, experts [T, k] (ids >= E are not run);
    wg, wu [E, D, F]; wd [E, F, D] -> float32 [T, D]."""
    rows, sizes, order = sort_by_expert(x, experts, wg.shape[0])
    y = grouped_swiglu(rows, sizes, wg, wu, wd, impl, max_group=x.shape[0])   # a token picks an expert once
    return combine(y, order, weights, experts, wg.shape[0])


def sort_by_expert(x, experts, num_experts: int):
    """(rows [R = T*k, D]: each assignment's token, sorted by expert; sizes [E] int32: rows per
    expert, ids >= E left out at the end; order [R]: the flat (token, slot) index of each row)."""
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros(num_experts + 1, jnp.int32).at[jnp.minimum(flat, num_experts)].add(1)[:num_experts]
    return x[order // k], sizes, order


def combine(y, order, weights, experts, num_experts: int):
    """Rows' outputs y [R, D] back in (token, slot) order, weighted and summed over the k slots in a
    fixed order -> [T, D] (so a token's sum does not depend on the batch)."""
    t, k = experts.shape
    w = jnp.where(experts < num_experts, weights, 0.0).reshape(-1)[order]
    y = jnp.zeros_like(y).at[order].set(y * w[:, None])
    return jnp.sum(y.reshape(t, k, -1), axis=1)


def grouped_swiglu(rows, sizes, wg, wu, wd, impl: str, max_group: int | None = None):
    """silu(rows @ wg[e]) * (rows @ wu[e]) @ wd[e] for each expert e's rows (sorted, `sizes` [E]
    of them each, from row 0; at most max_group each) -> float32; rows past sum(sizes) are zero.
    Each matmul rounds its input to the weights' dtype and sums in float32 (as layers.dense)."""
    if impl == "rounds":
        return _grouped_swiglu_rounds(rows, sizes, wg, wu, wd, max_group or rows.shape[0])
    gmm = _gmm(impl)
    x = rows.astype(wg.dtype)
    h = jax.nn.silu(gmm(x, wg, sizes)) * gmm(x, wu, sizes)
    return gmm(h.astype(wd.dtype), wd, sizes)


def _gmm(impl: str):
    """gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> float32 [M, N] (pallas_kernels/moe)."""
    if impl == "ragged_dot":
        from pallas_kernels.moe import gmm_reference
        return gmm_reference
    if impl.startswith("tpu"):
        from jax.experimental.pallas import tpu as pltpu

        from pallas_kernels.moe import gmm_tpu
        return functools.partial(gmm_tpu, interpret=pltpu.InterpretParams() if impl == "tpu-interpret" else None)
    from pallas_kernels.moe import gmm_gpu
    return functools.partial(gmm_gpu, interpret=impl == "gpu-interpret")


def _grouped_swiglu_rounds(rows, sizes, wg, wu, wd, max_group: int):
    """The CPU path, in rounds: round j runs rows [j*tm, (j+1)*tm) of every expert's group as one
    batched matmul over the experts ([E, tm, D] x [E, D, F]), so each expert's weights are read
    in place (a per-expert slice of the stacked weights costs XLA:CPU a copy of them, and small
    per-expert matmuls re-read them per chunk). Rounds run until the largest group is done
    (a dynamic trip count); tm is chosen per call from the group sizes (lax.switch over static
    sizes) to minimize rounds x (WEIGHT_READ_ROWS + tm), the cost of a round (benchmarks/moe.py)."""
    r, d = rows.shape
    starts = jnp.cumsum(sizes) - sizes
    largest = jnp.max(sizes)
    choices = [tm for tm in ROUND_ROWS if tm < 2 * max(max_group, ROUND_ROWS[0])]   # none much past a group
    cost = jnp.stack([(largest + tm - 1) // tm * (WEIGHT_READ_ROWS + tm) for tm in choices])
    padded = jnp.concatenate([rows, jnp.zeros((1, d), rows.dtype)])          # row r: zeros, for empty slots
    branches = [functools.partial(_rounds, tm=tm) for tm in choices]
    out = lax.switch(jnp.argmin(cost), branches, padded, starts, sizes, largest, (wg, wu, wd))
    return out[:r]


def _rounds(padded, starts, sizes, largest, weights, tm: int):
    r, d = padded.shape[0] - 1, padded.shape[1]
    wg, wu, wd = weights

    def round_j(j, out):
        offsets = j * tm + jnp.arange(tm)                                        # [tm]
        slots = jnp.where(offsets[None, :] < sizes[:, None], starts[:, None] + offsets[None, :], r)  # [E, tm]
        x = padded[slots]                                                        # [E, tm, D]
        h = jax.nn.silu(_batched(x, wg)) * _batched(x, wu)                       # [E, tm, F] float32
        y = _batched(h, wd)                                                      # [E, tm, D]; zero in row r
        return out.at[slots.reshape(-1)].set(y.reshape(-1, d))

    out = jnp.zeros((r + 1, d), jnp.float32)
    return lax.fori_loop(0, (largest + tm - 1) // tm, round_j, out)


def _batched(x, w):
    """x [E, M, K] @ w [E, K, N] per expert -> float32 [E, M, N] (x rounded to w's dtype)."""
    dims = (((2,), (1,)), ((0,), (0,)))
    return lax.dot_general(x.astype(w.dtype), w, dims, preferred_element_type=jnp.float32)


def routed_experts(p: dict, x, cfg: ModelConfig, impl: str, lmesh=None, axes: dict | None = None):
    """The routed experts of one MoE layer (the model adds a shared expert: models/transformer.py).
    p: the layer's router [D, E], we_gate, we_up [E, D, F], we_down [E, F, D]; x [T, D] -> float32
    [T, D]. impl: grouped_impl(...); lmesh: the engine's LogicalMesh (None: one device), with `axes`
    the logical axes of the three expert weights (their ParamSpecs' without "layers")."""
    weights, experts = route(x, p["router"], cfg)
    args = (x, weights, experts, p["we_gate"], p["we_up"], p["we_down"])
    if lmesh is None or not lmesh.splits:
        return dispatch(*args, impl)
    expert_axis = lmesh.mesh_axis("experts")
    summed = tuple(a for a in (expert_axis, lmesh.mesh_axis("moe_ffw")) if a is not None)
    if not summed:
        return dispatch(*args, impl)

    def per_device(x, weights, experts, wg, wu, wd):
        if expert_axis is not None:   # my experts are [first, first + local); others are not run
            local = wg.shape[0]
            experts = experts - lax.axis_index(expert_axis) * local
            experts = jnp.where((experts >= 0) & (experts < local), experts, local)
        return lax.psum(dispatch(x, weights, experts, wg, wu, wd, impl), summed)

    weight_axes = tuple(axes[name] for name in ("we_gate", "we_up", "we_down"))
    return lmesh.shard_map(per_device, in_axes=((), (), ()) + weight_axes, out_axes=())(*args)
