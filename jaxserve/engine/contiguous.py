"""A simple batched generate loop over a contiguous KV cache (replaced by the paged engine later).

Prompts are right-padded into one [B, T] prefill; each row then decodes at its own position. Shapes
are bucketed (powers of two) so a handful of compilations serve any batch; `compile_count` counts
them so tests can check that repeated calls with the same buckets do not recompile.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.checkpoint import LoadedModel
from jaxserve.engine.sampler import SamplingArrays, sample
from jaxserve.models import KVCache, forward, logits
from jaxserve.sampling_params import SamplingParams

MIN_PREFILL_BUCKET = 16
KV_BYTES_BUDGET = 2 << 30  # per generate batch; bounds how many prompts share one cache


def bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnums=0, donate_argnames="kv")
def _prefill(graphdef, state, kv, tokens, last_index, sampling):
    """tokens [B, T] right-padded; last_index [B]: index of each prompt's last token."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, kv = forward(graphdef, state, kv, tokens, positions)
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]  # [B, D]
    return sample(logits(graphdef, state, last), sampling, last_index + 1), kv


@functools.partial(jax.jit, static_argnums=0, donate_argnames="kv")
def _decode(graphdef, state, kv, tokens, positions, sampling):
    """tokens, positions [B]: the newest token of each row and its position."""
    hidden, kv = forward(graphdef, state, kv, tokens[:, None], positions[:, None])
    return sample(logits(graphdef, state, hidden[:, 0]), sampling, positions + 1), kv


@dataclasses.dataclass
class RowState:
    prompt_len: int
    params: SamplingParams
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


class ContiguousGenerator:
    """Generates token ids for batches of token-id prompts. `is_finished(row)` lets the caller stop a
    row early (stop strings); EOS, stop token ids and max_tokens are handled here."""

    def __init__(self, model: LoadedModel, eos_token_ids: tuple[int, ...] = (), max_batch: int = 32):
        self.model = model
        self.eos_token_ids = set(eos_token_ids)
        self.max_batch = max_batch
        cfg = model.config
        self.kv_bytes_per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(model.dtype).itemsize

    @staticmethod
    def compile_count() -> int:
        return _prefill._cache_size() + _decode._cache_size()

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 is_finished: Callable[[RowState], bool] | None = None) -> list[RowState]:
        rows = [RowState(len(p), sp) for p, sp in zip(prompts, params)]
        longest = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params))
        per_seq = self.kv_bytes_per_slot * bucket(longest)
        chunk = max(1, min(self.max_batch, KV_BYTES_BUDGET // per_seq))
        for start in range(0, len(prompts), chunk):
            self._run_batch(prompts[start:start + chunk], rows[start:start + chunk], is_finished)
        return rows

    def _run_batch(self, prompts, rows: list[RowState], is_finished):
        m = self.model
        batch = bucket(len(prompts))
        t = bucket(max(len(p) for p in prompts), MIN_PREFILL_BUCKET)
        max_len = bucket(max(t, max(len(p) + r.params.max_tokens for p, r in zip(prompts, rows))))
        tokens = np.zeros((batch, t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        last = np.asarray([len(p) - 1 for p in prompts] + [0] * (batch - len(prompts)), np.int32)
        sampling = SamplingArrays.from_params([r.params for r in rows], batch)
        kv = KVCache.zeros(m.config, batch, max_len, m.dtype)
        next_tokens, kv = _prefill(m.graphdef, m.params, kv, jnp.asarray(tokens), jnp.asarray(last), sampling)
        positions = last + 1
        while True:
            host_tokens = np.asarray(next_tokens)  # the one device-to-host copy per step
            for i, row in enumerate(rows):
                if row.finish_reason is None:
                    self._append(row, int(host_tokens[i]), is_finished)
            if all(r.finish_reason for r in rows):
                return
            next_tokens, kv = _decode(m.graphdef, m.params, kv, next_tokens, jnp.asarray(positions), sampling)
            positions = positions + 1

    def _append(self, row: RowState, token: int, is_finished):
        row.tokens.append(token)
        p = row.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            row.finish_reason = "stop"
        elif is_finished is not None and is_finished(row):
            row.finish_reason = "stop"
        elif len(row.tokens) >= p.max_tokens:
            row.finish_reason = "length"
