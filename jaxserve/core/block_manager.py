"""Fixed-size KV pages: who owns which page, and automatic prefix caching of full pages.

Page 0 is a null page never handed out: the runner points padding slots at it. Every other page is
either referenced by at least one request (ref count > 0) or sits in the free queue, which is also
the eviction order: allocation takes from the head. A full page is named by a chained hash of its
tokens and of everything before it, so two requests share a page only when their whole prefixes
agree. A page whose last reference goes away keeps its hash and stays findable until allocation
reuses it for other content (eviction).
"""
from __future__ import annotations

import collections
import hashlib

import numpy as np

from jaxserve.core.request import Request

NULL_PAGE = 0
_ROOT_HASH = b""


def page_hash(parent_hash: bytes, token_ids) -> bytes:
    """Chained content hash of one full page. sha256 so a collision (silently wrong KV) is not a concern."""
    tokens = np.asarray(token_ids, dtype=np.int64).tobytes()
    return hashlib.sha256(parent_hash + tokens).digest()


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"need num_pages >= 2 and page_size >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_pages
        # Keys only; the order is the eviction order (head first). OrderedDict gives O(1) removal
        # of a cached page from the middle when a request reuses it.
        self._free_queue: collections.OrderedDict[int, None] = collections.OrderedDict(
            (page, None) for page in range(1, num_pages))
        self._hash_to_page: dict[bytes, int] = {}
        self._page_to_hash: dict[int, bytes] = {}
        self._tables: dict[str, list[int]] = {}
        # Per request: chained hashes of its full pages, computed lazily and kept until `free`
        # (tokens are append-only, so they stay valid across steps).
        self._request_hashes: dict[str, list[bytes]] = {}
        # Per request: how many leading pages of its table are already registered or looked at.
        self._num_hashed_pages: dict[str, int] = {}

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages allocatable now, including cached ones no request references (evictable)."""
        return len(self._free_queue)

    @property
    def num_cached_pages(self) -> int:
        return len(self._hash_to_page)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_usable_pages

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def ref_count(self, page: int) -> int:
        return self._ref_counts[page]

    def page_table(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    # --- prefix cache ------------------------------------------------------------------------
    def lookup_prefix(self, request: Request) -> int:
        """Leading tokens of the request whose pages are cached: whole pages, and at most
        num_tokens - 1, so the last token is always computed (its logits are needed)."""
        return len(self._cached_prefix_pages(request)) * self.page_size

    def _cached_prefix_pages(self, request: Request) -> list[int]:
        # Prompt log-probabilities need every prompt token computed, so such requests skip the cache.
        if not self.enable_prefix_caching or request.params.prompt_logprobs:
            return []
        max_pages = (request.num_tokens - 1) // self.page_size
        hashes = self._full_page_hashes(request, max_pages)
        pages = []
        for h in hashes[:max_pages]:
            page = self._hash_to_page.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def _full_page_hashes(self, request: Request, count: int) -> list[bytes]:
        """The chained hashes of the request's first `count` pages (all must be full)."""
        hashes = self._request_hashes.setdefault(request.request_id, [])
        while len(hashes) < count:
            start = len(hashes) * self.page_size
            tokens = request.token_ids_between(start, start + self.page_size)
            hashes.append(page_hash(hashes[-1] if hashes else _ROOT_HASH, tokens))
        return hashes

    def cache_full_pages(self, request: Request) -> None:
        """Register the request's pages that computed tokens have filled since the last call."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.page_size, len(table))
        done = self._num_hashed_pages.get(request.request_id, 0)
        if num_full <= done:
            return
        hashes = self._full_page_hashes(request, num_full)
        for i in range(done, num_full):
            page = table[i]
            # Same content already cached under another page (two requests computed it at once):
            # keep the first; this page simply stays uncached.
            if page not in self._page_to_hash and hashes[i] not in self._hash_to_page:
                self._hash_to_page[hashes[i]] = page
                self._page_to_hash[page] = hashes[i]
        self._num_hashed_pages[request.request_id] = num_full

    # --- allocation --------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Make the request own pages for num_computed_tokens + num_new_tokens tokens.

        A request that owns no pages first takes its cached prefix (setting num_computed_tokens,
        and num_cached_tokens on its first admission); num_new_tokens then counts from there.
        Returns False, changing nothing, when the free queue cannot cover it.
        """
        rid = request.request_id
        table = self._tables.get(rid)
        hits = self._cached_prefix_pages(request) if not table else []
        num_computed = len(hits) * self.page_size if not table else request.num_computed_tokens
        num_owned = len(table or ()) + len(hits)
        num_fresh = max(0, self.pages_needed(num_computed + num_new_tokens) - num_owned)
        # A hit on an unreferenced cached page takes it out of the free queue too.
        num_revived = sum(1 for page in hits if self._ref_counts[page] == 0)
        if num_fresh + num_revived > self.num_free_pages:
            return False
        if table is None:
            table = self._tables[rid] = []
        if not table:
            self._take_cached_prefix(request, table, hits)
        for _ in range(num_fresh):
            table.append(self._take_free_page())
        return True

    def _take_cached_prefix(self, request: Request, table: list[int], hits: list[int]) -> None:
        for page in hits:
            if self._ref_counts[page] == 0:
                del self._free_queue[page]
            self._ref_counts[page] += 1
            table.append(page)
        cached_tokens = len(hits) * self.page_size
        request.num_computed_tokens = cached_tokens
        if request.num_preemptions == 0:
            request.num_cached_tokens = min(cached_tokens, request.num_prompt_tokens)
        self._num_hashed_pages[request.request_id] = len(hits)

    def _take_free_page(self) -> int:
        page, _ = self._free_queue.popitem(last=False)
        old_hash = self._page_to_hash.pop(page, None)
        if old_hash is not None:  # evict: the page is about to hold other content
            del self._hash_to_page[old_hash]
        self._ref_counts[page] = 1
        return page

    def free(self, request_id: str) -> None:
        """Drop the request's references. Unknown ids are ignored (e.g. aborted before admission)."""
        table = self._tables.pop(request_id, [])
        self._request_hashes.pop(request_id, None)
        self._num_hashed_pages.pop(request_id, None)
        # Reverse order: a prefix's tail pages are evicted before its head, which more requests share.
        for page in reversed(table):
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                self._release(page)

    def _release(self, page: int) -> None:
        self._free_queue[page] = None
        if page not in self._page_to_hash:
            # Nothing can hit an uncached page, so reuse it before evicting anything cached.
            self._free_queue.move_to_end(page, last=False)

    # --- checks ------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests call this after every op)."""
        refs = collections.Counter(page for table in self._tables.values() for page in table)
        assert NULL_PAGE not in refs and NULL_PAGE not in self._free_queue, "null page handed out"
        assert self._ref_counts[NULL_PAGE] == 0, "null page referenced"
        for table in self._tables.values():
            assert len(set(table)) == len(table), f"page twice in one table: {table}"
        for page in range(1, self.num_pages):
            count = self._ref_counts[page]
            assert count == refs.get(page, 0), f"page {page}: ref count {count} != {refs.get(page, 0)}"
            assert (count > 0) != (page in self._free_queue), f"page {page}: ref {count}, free/used mismatch"
        assert len(self._free_queue) + len(refs) == self.num_usable_pages
        assert len(self._hash_to_page) == len(self._page_to_hash)
        for h, page in self._hash_to_page.items():
            assert self._page_to_hash.get(page) == h, f"page {page}: hash maps disagree"
        if not self._tables:
            assert self.num_free_pages == self.num_usable_pages, "pages leaked"
