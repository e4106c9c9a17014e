"""The device side of a step: StepPlan -> padded ragged arrays -> two compiled calls -> RunnerOutput.

Every shape bucket is compiled ahead of time at start-up (`lower().compile()`), so serving never
traces. A bucket is a padded token count T (powers of two up to the token budget) with
B = min(T, max_num_seqs) sequence rows; a step that would need anything else trips the
recompilation counter (`compile_count`, one per bucket), which tests assert stays flat after warm-up.

A step is the forward program of its bucket (KV write, attention, the last tokens' logits [B, V])
followed by the sampler program of its row count B. The sampler depends on B alone, so buckets
with the same B share one compiled sampler: it is ~40% of a bucket's compile time (~1 s of
~2.5 s on a 2-core CPU), and every bucket at or above max_num_seqs has the same B. The logits stay
on the device between the two; the one device-to-host copy per step is still the packed sample.
"""
from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.checkpoint import LoadedModel
from jaxserve.core.plan import RunnerOutput, StepPlan
from jaxserve.models import KVPages, empty_kv_pages, forward, kv_page_axes, logits
from jaxserve.ops.backends import AttentionBackend
from jaxserve.ops.sampling import PenaltyState, record_tokens, sample, set_penalty_row
from jaxserve.parallel import LogicalMesh, logical_mesh
from jaxserve.runner.batch import StepBatch, host_batch, unpack_prompt_logprobs, unpack_sampled
from jaxserve.runner.kv_calibration import calibrate
from jaxserve.runner.page_transfer import PageMover
from jaxserve.runner.penalties import PenaltySlots
from pallas_kernels.kv_formats import KVFormat

log = logging.getLogger(__name__)
MIN_BUCKET = 4  # small decode batches should not pay for 16 padded tokens


class RunnerState(NamedTuple):
    """Everything the step updates in place (donated): KV pages and penalty statistics."""
    kv: KVPages
    penalties: PenaltyState


def _forward_step(graphdef, backend: AttentionBackend, lmesh: LogicalMesh | None, score: bool, params,
                  state: RunnerState, batch: StepBatch):
    """The model part of a step: the logits [B, V] of each sequence's last token, and with `score`
    the log-probability [T] of each token's prompt target (a variant compiled on first use: it
    needs logits for every token, not just the last ones)."""
    penalties = record_tokens(state.penalties, batch.token_slots, batch.tokens, batch.is_output)
    hidden, kv = forward(graphdef, params, state.kv, batch.tokens, batch.positions, batch.meta, backend, lmesh)
    last_logits = logits(graphdef, params, hidden[batch.logits_indices])  # [B, vocab]
    scores = None
    if score:
        all_logits = logits(graphdef, params, hidden)  # [T, vocab]
        target = jnp.take_along_axis(all_logits, batch.prompt_targets[:, None], axis=1)[:, 0]
        scores = target - jax.nn.logsumexp(all_logits, axis=-1)
    return (last_logits, scores), RunnerState(kv, penalties)


def token_buckets(max_tokens: int) -> list[int]:
    buckets, t = [], MIN_BUCKET
    while t < max_tokens:
        buckets.append(t)
        t *= 2
    return buckets + [max(max_tokens, MIN_BUCKET)]


def _initial_state(cfg, fmt: KVFormat, num_pages: int, page_size: int, max_num_seqs: int, *calibrated):
    """calibrated: (k_chan, v_chan, k_center) for quantized pages (jaxserve.runner.kv_calibration)."""
    vocab = cfg.vocab_size
    return RunnerState(empty_kv_pages(cfg, fmt, num_pages, page_size, *calibrated),
                       PenaltyState(jnp.zeros((max_num_seqs, vocab), jnp.int8),
                                    jnp.zeros((max_num_seqs, vocab), jnp.int32)))


def _shardings_of(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


class ModelRunner:
    """mesh: None (one device) or the engine's mesh; the model's params must already be placed on it
    (jaxserve.parallel), and the runner places its own state by the same logical-axis table."""

    def __init__(self, model: LoadedModel, num_pages: int, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, kv_format: KVFormat,
                 backend: AttentionBackend, mesh=None, kv_transfer_dtype: str = "auto"):
        self.model, self.page_size, self.max_num_seqs = model, page_size, max_num_seqs
        self.backend, self.lmesh = backend, logical_mesh(model.config, mesh)
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.buckets = token_buckets(max_num_batched_tokens)
        self.slots = PenaltySlots(max_num_seqs, model.config.vocab_size)
        calibrated = calibrate(model, kv_format, self.lmesh) if kv_format.quantized else ()
        make = functools.partial(_initial_state, model.config, kv_format, num_pages, page_size, max_num_seqs)
        self.state = self._place_state(make, *calibrated)
        self.compile_count = 0
        self._compiled = {}   # (T, score) -> forward program
        self._samplers = {}   # B -> sampler program
        keep = {} if mesh is None else {"out_shardings": _shardings_of(self.state.penalties)}
        self._set_row = jax.jit(set_penalty_row, donate_argnums=0, **keep)
        for t in self.buckets:
            self._compile(t, score=False)
        pages_at = (self.lmesh.sharding(kv_page_axes(self.state.kv).k) if self.lmesh is not None
                    else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        self.pages = PageMover(self.state.kv, kv_transfer_dtype, pages_at,
                               None if self.lmesh is None else _shardings_of(self.state.kv))
        self._staged: dict[str, list] = {}  # request id -> its arrived pages, written by the next plan

    # --- disaggregated serving: a request's pages out of this pool, or into it --------------------
    def compile_transfers(self) -> None:
        """The page gather and scatter programs for every transfer size (disaggregated engines)."""
        if not self.pages.compile_count:
            self.pages.compile(self.state.kv, self.max_pages_per_seq)

    def export_pages(self, pages: list[int]) -> tuple[list, int]:
        """The pages' arrays (dispatched; the next step's donation waits for the read), and their bucket."""
        return self.pages.gather(self.state.kv, pages)

    def stage_import(self, request_id: str, arrays) -> None:
        """Arrived pages (already in this pool's layout) for the plan that lists the request's import."""
        self._staged[request_id] = arrays

    def drop_import(self, request_id: str) -> None:
        self._staged.pop(request_id, None)

    def _place_state(self, make, *args) -> RunnerState:
        """Builds the state straight into its shardings (never whole on one device): KV pages split
        by the axis table, penalty tables replicated."""
        if self.lmesh is None:
            return make(*args)
        shape = jax.eval_shape(make, *args)
        axes = RunnerState(kv_page_axes(shape.kv), jax.tree.map(lambda _: (), shape.penalties))
        return jax.jit(make, out_shardings=self.lmesh.shardings(axes))(*args)

    def _host_shape(self, a) -> jax.ShapeDtypeStruct:
        sharding = None if self.lmesh is None else self.lmesh.sharding(())
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    def _batch(self, plan_chunks, t: int) -> StepBatch:
        return host_batch(plan_chunks, t, min(t, self.max_num_seqs), self.max_pages_per_seq, self.page_size,
                          self.slots.slot_of, self.slots.no_slot)

    def _compile(self, t: int, score: bool):
        """The bucket's forward program, and the sampler of its row count unless one exists."""
        batch = jax.tree.map(self._host_shape, self._batch((), t))
        # (logits, scores) replicated for the sampler and the host copy; the donated state stays where
        # it is (buffers reused)
        placement = {} if self.lmesh is None else {
            "out_shardings": (self.lmesh.sharding(()), _shardings_of(self.state))}
        jitted = jax.jit(_forward_step, static_argnums=(0, 1, 2, 3), donate_argnums=5, **placement)
        lowered = jitted.lower(self.model.graphdef, self.backend, self.lmesh, score, self.model.params, self.state,
                               batch)
        self._compiled[t, score] = lowered.compile()
        rows = batch.logits_indices.shape[0]
        if rows not in self._samplers:
            last_logits = self._host_shape(jax.ShapeDtypeStruct((rows, self.model.config.vocab_size), jnp.float32))
            jitted = jax.jit(sample, **({} if self.lmesh is None else {"out_shardings": self.lmesh.sharding(())}))
            self._samplers[rows] = jitted.lower(last_logits, batch.sampling, self.state.penalties,
                                                batch.want_logprobs).compile()
        self.compile_count += 1

    def bucket_for(self, num_tokens: int) -> int:
        return next(t for t in self.buckets if t >= num_tokens)

    def execute(self, plan: StepPlan) -> RunnerOutput:
        """Releases what the plan says is done, then runs its chunks: the sampled token of every chunk
        that samples (and prompt log-probabilities). An empty plan only releases."""
        self.slots.release(plan.finished_ids + plan.preempted_ids)
        for imp in plan.imports:
            kv = self.pages.scatter(self.state.kv, self._staged.pop(imp.request_id), imp.first_page, imp.page_ids)
            self.state = self.state._replace(kv=kv)
        if not plan.chunks:
            return RunnerOutput({})
        for slot, seen, counts in self.slots.assign(plan.chunks):
            self.state = self.state._replace(penalties=self._set_row(self.state.penalties, slot, seen, counts))
        t = self.bucket_for(plan.num_tokens)
        score = any(c.prompt_targets for c in plan.chunks)
        if (t, score) not in self._compiled:
            if score:  # expected: the scoring variant is built when first asked for
                log.info("compiling the prompt-logprob step for %d tokens", t)
            else:  # the tripwire: never expected after start-up
                log.warning("recompiling for %d tokens (compile #%d)", t, self.compile_count + 1)
            self._compile(t, score)
        batch = self._batch(plan.chunks, t)
        (last_logits, scores), self.state = self._compiled[t, score](self.model.params, self.state, batch)
        packed = self._samplers[len(batch.logits_indices)](last_logits, batch.sampling, self.state.penalties,
                                                           batch.want_logprobs)
        sampled = unpack_sampled(np.asarray(packed), plan.chunks)  # the one device-to-host copy per step
        return RunnerOutput(sampled, unpack_prompt_logprobs(None if scores is None else np.asarray(scores),
                                                            plan.chunks))
