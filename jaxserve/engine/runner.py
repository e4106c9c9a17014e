"""The device side of a step: StepPlan -> padded ragged arrays -> one compiled call -> sampled tokens.

Every shape bucket is compiled ahead of time at start-up (`lower().compile()`), so serving never
traces. A bucket is a padded token count T (powers of two up to the token budget) with
B = min(T, max_num_seqs) sequence rows; a step that would need anything else trips the
recompilation counter (`compile_count`), which tests assert stays flat after warm-up.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.checkpoint import LoadedModel
from jaxserve.engine.kv_calibration import calibrate
from jaxserve.engine.sampler import (MAX_LOGPROBS, PenaltyState, SamplingInputs, record_tokens, sample,
                                     set_penalty_row)
from jaxserve.models import AttentionMetadata, KVPages, empty_kv_pages, forward, logits
from jaxserve.ops.head_parallel import HeadParallel
from jaxserve.parallel import head_parallel, kv_shardings, replicated
from pallas_kernels.kv_quant import KVFormat

log = logging.getLogger(__name__)
MIN_BUCKET = 4  # small decode batches should not pay for 16 padded tokens


class RunnerState(NamedTuple):
    """Everything the step updates in place (donated): KV pages and penalty statistics."""
    kv: KVPages
    penalties: PenaltyState


class StepBatch(NamedTuple):
    tokens: jax.Array          # [T]
    positions: jax.Array       # [T]
    meta: AttentionMetadata
    logits_indices: jax.Array  # [B] flat index of each sequence's last token
    token_slots: jax.Array     # [T] penalty slot of each token's request (num_slots: none)
    is_output: jax.Array       # [T] the token is a generated one
    sampling: SamplingInputs   # [B] each
    want_logprobs: jax.Array   # [] a request asks for log-probabilities (0: of its token only)
    prompt_targets: jax.Array  # [T] the next prompt token after each token (scoring steps only)


def _step(graphdef, attention_impl: str, heads: HeadParallel | None, score: bool, params, state: RunnerState,
          batch: StepBatch):
    """One engine step. With `score`, also the log-probability [T] of each token's prompt target
    (a variant compiled on first use: it needs logits for every token, not just the last ones)."""
    penalties = record_tokens(state.penalties, batch.token_slots, batch.tokens, batch.is_output)
    hidden, kv = forward(graphdef, params, state.kv, batch.tokens, batch.positions, batch.meta, attention_impl,
                         heads)
    last = hidden[batch.logits_indices]  # [B, D]
    packed = sample(logits(graphdef, params, last), batch.sampling, penalties, batch.want_logprobs)
    scores = None
    if score:
        all_logits = logits(graphdef, params, hidden)  # [T, vocab]
        target = jnp.take_along_axis(all_logits, batch.prompt_targets[:, None], axis=1)[:, 0]
        scores = target - jax.nn.logsumexp(all_logits, axis=-1)
    return (packed, scores), RunnerState(kv, penalties)


@dataclasses.dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]  # (token id, logprob), best first; () when not asked


@dataclasses.dataclass(frozen=True)
class RunnerOutput:
    sampled: dict[str, SampledToken]         # per chunk that samples
    prompt_logprobs: dict[str, dict[int, float]]  # per prompt_logprobs chunk: {position of scored token: logprob}


def token_buckets(max_tokens: int) -> list[int]:
    buckets, t = [], MIN_BUCKET
    while t < max_tokens:
        buckets.append(t)
        t *= 2
    return buckets + [max(max_tokens, MIN_BUCKET)]


def _initial_state(cfg, fmt: KVFormat, num_pages: int, page_size: int, max_num_seqs: int, *calibrated):
    """calibrated: (k_chan, v_chan, k_center) for quantized pages (jaxserve.engine.kv_calibration)."""
    vocab = cfg.vocab_size
    return RunnerState(empty_kv_pages(cfg, fmt, num_pages, page_size, *calibrated),
                       PenaltyState(jnp.zeros((max_num_seqs, vocab), jnp.int8),
                                    jnp.zeros((max_num_seqs, vocab), jnp.int32)))


def _shardings_of(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


class ModelRunner:
    """mesh: None (one device) or the engine's tensor-parallel mesh; the model's params must already
    be placed on it (jaxserve.parallel.shard_params), and the runner places its own state."""

    def __init__(self, model: LoadedModel, num_pages: int, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, kv_format: KVFormat, attention_impl: str = "xla",
                 mesh=None):
        self.model, self.page_size, self.max_num_seqs = model, page_size, max_num_seqs
        self.attention_impl, self.mesh = attention_impl, mesh
        self.heads = head_parallel(model.config, mesh)
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.buckets = token_buckets(max_num_batched_tokens)
        calibrated = calibrate(model, kv_format, self.heads) if kv_format.quantized else ()
        make = functools.partial(_initial_state, model.config, kv_format, num_pages, page_size, max_num_seqs)
        self.state = self._place_state(make, *calibrated)
        self.free_slots = list(range(max_num_seqs))[::-1]
        self.slots: dict[str, int] = {}
        self.compile_count = 0
        self._compiled = {}
        keep = {} if mesh is None else {"out_shardings": _shardings_of(self.state.penalties)}
        self._set_row = jax.jit(set_penalty_row, donate_argnums=0, **keep)
        for t in self.buckets:
            self._compile(t, score=False)

    def _state_shardings(self, state: RunnerState) -> RunnerState:
        """KV pages split by the axis table; penalty tables replicated."""
        return RunnerState(kv_shardings(self.model.config, self.mesh, state.kv),
                           jax.tree.map(lambda _: replicated(self.mesh), state.penalties))

    def _place_state(self, make, *args) -> RunnerState:
        """Builds the state straight into its shardings (never whole on one device)."""
        if self.mesh is None:
            return make(*args)
        shardings = self._state_shardings(jax.eval_shape(make, *args))
        return jax.jit(make, out_shardings=shardings)(*args)

    def _host_shape(self, a) -> jax.ShapeDtypeStruct:
        sharding = None if self.mesh is None else replicated(self.mesh)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    def _compile(self, t: int, score: bool):
        batch = jax.tree.map(self._host_shape, self._host_batch([], t))
        # (sampled, scores) replicated for the host copy; the donated state stays where it is (buffers reused)
        placement = {} if self.mesh is None else {"out_shardings": (replicated(self.mesh), _shardings_of(self.state))}
        jitted = jax.jit(_step, static_argnums=(0, 1, 2, 3), donate_argnums=5, **placement)
        self._compiled[t, score] = jitted.lower(self.model.graphdef, self.attention_impl, self.heads, score,
                                                self.model.params, self.state, batch).compile()
        self.compile_count += 1

    def bucket_for(self, num_tokens: int) -> int:
        return next(t for t in self.buckets if t >= num_tokens)

    def execute(self, plan) -> RunnerOutput:
        """Runs one step: the sampled token of every chunk that samples (and prompt log-probabilities)."""
        self.release(plan.preempted_ids)
        self._assign_penalty_slots(plan.chunks)
        t = self.bucket_for(plan.num_tokens)
        score = any(c.prompt_targets for c in plan.chunks)
        if (t, score) not in self._compiled:
            if score:  # expected: the scoring variant is built when first asked for
                log.info("compiling the prompt-logprob step for %d tokens", t)
            else:  # the tripwire: never expected after start-up
                log.warning("recompiling for %d tokens (compile #%d)", t, self.compile_count + 1)
            self._compile(t, score)
        (packed, scores), self.state = self._compiled[t, score](
            self.model.params, self.state, self._host_batch(plan.chunks, t))
        sampled = self._unpack(np.asarray(packed), plan.chunks)  # the one device-to-host copy per step
        return RunnerOutput(sampled, self._prompt_logprobs(None if scores is None else np.asarray(scores), plan.chunks))

    @staticmethod
    def _prompt_logprobs(scores, chunks) -> dict[str, dict[int, float]]:
        out, start = {}, 0
        for c in chunks:
            if c.prompt_targets:
                n = len(c.prompt_targets)  # token i of the chunk scores the token at position start_position + i + 1
                out[c.request_id] = dict(zip(range(c.start_position + 1, c.start_position + 1 + n),
                                             scores[start:start + n].tolist()))
            start += c.num_tokens
        return out

    def release(self, request_ids):
        for rid in request_ids:
            if rid in self.slots:
                self.free_slots.append(self.slots.pop(rid))

    def _assign_penalty_slots(self, chunks):
        vocab = self.model.config.vocab_size
        for c in chunks:
            if c.params.has_penalties and c.request_id not in self.slots:
                slot = self.slots[c.request_id] = self.free_slots.pop()
                done = np.asarray(c.history, np.int64)  # tokens already in the cache (prefix hits)
                seen, counts = np.zeros(vocab, np.int8), np.zeros(vocab, np.int32)
                seen[done[:c.num_prompt_tokens]] = 1
                np.add.at(counts, done[c.num_prompt_tokens:], 1)
                self.state = self.state._replace(penalties=self._set_row(self.state.penalties, slot, seen, counts))

    def _host_batch(self, chunks, t: int) -> StepBatch:
        b, ps = min(t, self.max_num_seqs), self.page_size
        tokens, positions, slot_mapping = (np.zeros(t, np.int32) for _ in range(3))
        token_slots, is_output = np.full(t, self.max_num_seqs, np.int32), np.zeros(t, bool)
        targets = np.zeros(t, np.int32)
        kv_lens, logits_indices = np.zeros(b, np.int32), np.zeros(b, np.int32)
        page_tables = np.zeros((b, self.max_pages_per_seq), np.int32)
        cu = np.zeros(b + 1, np.int32)
        for i, c in enumerate(chunks):
            n, start = len(c.token_ids), cu[i]
            pos = np.arange(c.start_position, c.start_position + n, dtype=np.int32)
            table = np.asarray(c.page_table, np.int32)
            tokens[start:start + n], positions[start:start + n] = c.token_ids, pos
            slot_mapping[start:start + n] = table[pos // ps] * ps + pos % ps
            token_slots[start:start + n] = self.slots.get(c.request_id, self.max_num_seqs)
            is_output[start:start + n] = pos >= c.num_prompt_tokens
            targets[start:start + len(c.prompt_targets)] = c.prompt_targets
            page_tables[i, :len(table)] = table
            kv_lens[i], cu[i + 1], logits_indices[i] = c.start_position + n, start + n, start + n - 1
        cu[len(chunks) + 1:] = cu[len(chunks)]
        meta = AttentionMetadata(slot_mapping, kv_lens, page_tables, cu, np.int32(len(chunks)))
        return StepBatch(tokens, positions, meta, logits_indices, token_slots, is_output,
                         self._sampling_inputs(chunks, b), np.bool_(any(c.params.logprobs is not None for c in chunks)), targets)

    def _sampling_inputs(self, chunks, b: int) -> SamplingInputs:
        def column(fn, dtype, pad):
            return np.asarray([fn(c) for c in chunks] + [pad] * (b - len(chunks)), dtype)

        return SamplingInputs(
            column(lambda c: c.params.temperature, np.float32, 0.0),
            column(lambda c: max(c.params.top_k, 0), np.int32, 0),
            column(lambda c: c.params.top_p, np.float32, 1.0),
            column(lambda c: c.params.min_p, np.float32, 0.0),
            column(lambda c: c.params.repetition_penalty, np.float32, 1.0),
            column(lambda c: c.params.presence_penalty, np.float32, 0.0),
            column(lambda c: c.params.frequency_penalty, np.float32, 0.0),
            column(lambda c: c.seed, np.int32, 0),
            column(lambda c: c.start_position + len(c.token_ids), np.int32, 0),
            column(lambda c: self.slots.get(c.request_id, self.max_num_seqs), np.int32, self.max_num_seqs))

    @staticmethod
    def _unpack(packed: np.ndarray, chunks) -> dict[str, SampledToken]:
        out = {}
        for i, c in enumerate(chunks):
            if not c.samples:
                continue
            row, n = packed[i], c.params.logprobs or 0
            ids, lps = row[2:2 + MAX_LOGPROBS][:n].astype(int), row[2 + MAX_LOGPROBS:][:n]
            out[c.request_id] = SampledToken(int(row[0]), float(row[1]), tuple(zip(ids.tolist(), lps.tolist())))
        return out
