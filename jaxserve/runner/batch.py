"""StepPlan -> the padded arrays of one compiled step, and the step's packed result -> RunnerOutput.

Host-side numpy only: the runner hands the StepBatch to the compiled step and the one array it
copies back to `unpack_sampled`. A bucket of T padded tokens has B = min(T, max_num_seqs)
sequence rows; padding tokens write to the null page's slots and padding rows sample nothing.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from jaxserve.core.plan import SampledToken, ScheduledChunk
from jaxserve.ops.attention import AttentionMetadata
from jaxserve.ops.sampling import MAX_LOGPROBS, SamplingInputs


class StepBatch(NamedTuple):
    tokens: np.ndarray          # [T]
    positions: np.ndarray       # [T]
    meta: AttentionMetadata
    logits_indices: np.ndarray  # [B] flat index of each sequence's last token
    token_slots: np.ndarray     # [T] penalty slot of each token's request (num_slots: none)
    is_output: np.ndarray       # [T] the token is a generated one
    sampling: SamplingInputs    # [B] each
    want_logprobs: np.ndarray   # [] a request asks for log-probabilities (0: of its token only)
    prompt_targets: np.ndarray  # [T] the next prompt token after each token (scoring steps only)


def host_batch(chunks: tuple[ScheduledChunk, ...], t: int, num_rows: int, max_pages_per_seq: int, page_size: int,
               slot_of: Callable[[str], int], no_slot: int) -> StepBatch:
    """The padded arrays of a bucket of t tokens and num_rows sequence rows."""
    b, ps = num_rows, page_size
    tokens, positions, slot_mapping = (np.zeros(t, np.int32) for _ in range(3))
    token_slots, is_output = np.full(t, no_slot, np.int32), np.zeros(t, bool)
    targets = np.zeros(t, np.int32)
    kv_lens, logits_indices = np.zeros(b, np.int32), np.zeros(b, np.int32)
    page_tables = np.zeros((b, max_pages_per_seq), np.int32)
    cu = np.zeros(b + 1, np.int32)
    for i, c in enumerate(chunks):
        n, start = len(c.token_ids), cu[i]
        pos = np.arange(c.start_position, c.start_position + n, dtype=np.int32)
        table = np.asarray(c.page_table, np.int32)
        tokens[start:start + n], positions[start:start + n] = c.token_ids, pos
        slot_mapping[start:start + n] = table[pos // ps] * ps + pos % ps
        token_slots[start:start + n] = slot_of(c.request_id)
        is_output[start:start + n] = pos >= c.num_prompt_tokens
        targets[start:start + len(c.prompt_targets)] = c.prompt_targets
        page_tables[i, :len(table)] = table
        kv_lens[i], cu[i + 1], logits_indices[i] = c.start_position + n, start + n, start + n - 1
    cu[len(chunks) + 1:] = cu[len(chunks)]
    meta = AttentionMetadata(slot_mapping, kv_lens, page_tables, cu, np.int32(len(chunks)))
    want_logprobs = np.bool_(any(c.params.logprobs is not None for c in chunks))
    return StepBatch(tokens, positions, meta, logits_indices, token_slots, is_output,
                     sampling_inputs(chunks, b, slot_of, no_slot), want_logprobs, targets)


def sampling_inputs(chunks, b: int, slot_of: Callable[[str], int], no_slot: int) -> SamplingInputs:
    """Each chunk's sampling row, padded to b rows with greedy no-penalty rows."""
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
        column(lambda c: c.end_position, np.int32, 0),
        column(lambda c: slot_of(c.request_id), np.int32, no_slot))


def unpack_sampled(packed: np.ndarray, chunks) -> dict[str, tuple[SampledToken, ...]]:
    """packed [B, PACKED_WIDTH] (ops.sampling) -> the accepted tokens of every chunk that samples."""
    out = {}
    for i, c in enumerate(chunks):
        if not c.samples:
            continue
        row, n = packed[i], c.params.logprobs or 0
        ids, lps = row[2:2 + MAX_LOGPROBS][:n].astype(int), row[2 + MAX_LOGPROBS:][:n]
        out[c.request_id] = (SampledToken(int(row[0]), float(row[1]), tuple(zip(ids.tolist(), lps.tolist()))),)
    return out


def unpack_prompt_logprobs(scores: np.ndarray | None, chunks) -> dict[str, dict[int, float]]:
    """scores [T]: token i of a chunk scores the prompt token at position start_position + i + 1."""
    out, start = {}, 0
    for c in chunks:
        if c.prompt_targets:
            n = len(c.prompt_targets)
            out[c.request_id] = dict(zip(range(c.start_position + 1, c.start_position + 1 + n),
                                         scores[start:start + n].tolist()))
        start += c.num_tokens
    return out
