"""The scheduler's side of disaggregated serving (jaxserve/disagg): a prefill engine's requests are
exported after their first token, their pages pinned until `release_export`; a decode engine's
imports reserve a seat and pages at once (or are refused, changing nothing), wait as `receiving`
until their KV has arrived, then join `running` with a PageImport in the plan that writes it.

A mixin of Scheduler (same state: `running`, `waiting`, `_requests`, the block manager); kept apart
so the scheduling loop reads on its own. Pure Python like the rest of jaxserve/core.
"""
from __future__ import annotations

import bisect

from jaxserve.core.plan import PageImport
from jaxserve.core.request import Request, RequestStatus


def queue_key(request: Request) -> tuple[int, float]:
    """The order of `waiting` and `running`: priority, then arrival."""
    return request.priority, request.arrival_time


class ExportImportMixin:
    # Scheduler state this mixin works on (set in Scheduler.__init__).
    running: list[Request]
    waiting: list[Request]
    exported: dict[str, Request]
    receiving: dict[str, Request]
    _arrived: set[str]
    _fresh_imports: set[str]
    num_import_fallbacks: int

    def release_export(self, request_id: str) -> bool:
        """The decode side has the exported request's KV (or gave up on it): free its pages, once.
        False when the id is not an exported request (already released, or never exported)."""
        if request_id not in self.exported:
            return False
        self.finish(request_id, RequestStatus.FINISHED_STOPPED)
        return True

    def add_import(self, request: Request) -> bool:
        """Takes over a request another engine prefilled: all its tokens but the last have KV there.
        Reserves a seat and pages for every token (prefix-cache hits here need no transfer); False,
        changing nothing, when either is short, so the caller can retry or go elsewhere."""
        self._validate(request)
        if len(self.running) + len(self.receiving) >= self.max_num_seqs:
            return False
        hits = self.block_manager.lookup_prefix(request)
        num_cached = request.num_cached_tokens  # the prefill side's figure, kept for usage
        if not self.block_manager.allocate(request, request.num_tokens - hits):
            self.block_manager.free(request.request_id)  # forget the hashes the lookup computed
            return False
        request.num_cached_tokens = num_cached
        request.status = RequestStatus.RECEIVING
        self._requests[request.request_id] = request
        self.receiving[request.request_id] = request
        return True

    def import_first_page(self, request_id: str) -> int:
        """Leading pages the prefix cache gave a receiving request: the transfer skips them."""
        return self.receiving[request_id].num_computed_tokens // self.block_manager.page_size

    def mark_arrived(self, request_id: str) -> None:
        """The request's KV is on this side: the next plan writes it and the request decodes."""
        if request_id in self.receiving:
            self._arrived.add(request_id)

    def fall_back_to_recompute(self, request_id: str) -> bool:
        """A receiving request whose transfer failed: drop its reserved pages and queue it to
        prefill here (as a preempted request recomputes). False if it is not receiving."""
        request = self.receiving.pop(request_id, None)
        if request is None:
            return False
        self._arrived.discard(request_id)
        self.block_manager.free(request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1  # recomputed like a preempted request (keeps its cached-token count)
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=queue_key)
        self.num_import_fallbacks += 1
        return True

    def _promote_arrived(self) -> dict[str, tuple[Request, int]]:
        """Arrived imports join `running` with every token but the last computed."""
        promoted = {rid: (r, self.import_first_page(rid)) for rid, r in self.receiving.items() if rid in self._arrived}
        for rid, (request, _) in promoted.items():
            del self.receiving[rid]
            self._arrived.discard(rid)
            request.num_computed_tokens = request.num_tokens - 1
            request.status = RequestStatus.RUNNING
            self._fresh_imports.add(rid)  # its first chunk carries the history penalties need
            bisect.insort(self.running, request, key=queue_key)
        return promoted

    def _take_fresh(self, request: Request) -> bool:
        """Whether this is the first chunk of a promoted import (then it is admitted: penalty history)."""
        if request.request_id in self._fresh_imports:
            self._fresh_imports.discard(request.request_id)
            return True
        return False

    def _page_import(self, request: Request, first: int) -> PageImport:
        bm = self.block_manager
        table = bm.page_table(request.request_id)[:bm.pages_needed(request.num_computed_tokens)]
        return PageImport(request.request_id, first, tuple(table[first:]))

    def _export(self, request: Request) -> None:
        """After its first token: out of the batch, its pages pinned until release_export."""
        self.running.remove(request)
        request.status = RequestStatus.EXPORTED
        self.exported[request.request_id] = request
        self._finished_ids.append(request.request_id)  # the runner releases its row now

