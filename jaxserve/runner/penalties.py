"""Which row of the on-device penalty tables each penalised request owns.

The tables (ops.sampling.PenaltyState, [max_num_seqs, vocab]) count the tokens every penalised
request has seen. A request takes a row when it is first scheduled (with the tokens the prefix
cache spared it, `ScheduledChunk.history`) and gives it back when a plan lists it as finished or
preempted: the runner owns the rows, the plan says when to let go.
"""
from __future__ import annotations

import numpy as np

from jaxserve.core.plan import ScheduledChunk


class PenaltySlots:
    def __init__(self, num_slots: int, vocab_size: int):
        self.num_slots, self.vocab_size = num_slots, vocab_size
        self._free = list(range(num_slots))[::-1]
        self._slots: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def no_slot(self) -> int:
        """The row index that means "no penalties" (one past the tables)."""
        return self.num_slots

    def slot_of(self, request_id: str) -> int:
        return self._slots.get(request_id, self.num_slots)

    def release(self, request_ids) -> None:
        for rid in request_ids:
            if rid in self._slots:
                self._free.append(self._slots.pop(rid))

    def assign(self, chunks: tuple[ScheduledChunk, ...]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Rows for penalised requests that have none yet: (slot, prompt_seen [V] int8, output_counts
        [V] int32) to write, from the tokens already in the cache."""
        rows = []
        for c in chunks:
            if c.params.has_penalties and c.request_id not in self._slots:
                slot = self._slots[c.request_id] = self._free.pop()
                done = np.asarray(c.history, np.int64)
                seen, counts = np.zeros(self.vocab_size, np.int8), np.zeros(self.vocab_size, np.int32)
                seen[done[:c.num_prompt_tokens]] = 1
                np.add.at(counts, done[c.num_prompt_tokens:], 1)
                rows.append((slot, seen, counts))
        return rows
