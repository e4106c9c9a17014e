"""What a prefill engine hands a decode engine: the request's state, its KV pages (a source the
receiver fetches from), and a lease on the pages the prefill side keeps pinned until it ends.

The lease ends exactly once, by whichever comes first: the decode side confirming receipt (its
pages are written), the decode side or the caller giving up on the transfer (abort, refusal
everywhere, a failed or timed-out transfer that falls back to recomputing), or the prefill side's
own expiry of leases nobody ended (a decode process that died). Pinning the source pages until
then is what bounds the staged copies: a prefill engine whose exports are not taken stops
admitting new prompts instead of filling memory.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Protocol

from jaxserve.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class RequestState:
    """A prefilled request, as plain data (it crosses processes): everything the decode side needs
    to continue exactly as the prefill side would have."""
    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]   # the first sampled token (KV exists for all tokens but the last)
    params: SamplingParams
    priority: int
    sampling_seed: int
    num_cached_tokens: int              # prompt tokens the prefill side's prefix cache served
    queue_time: float                   # seconds from arrival to first scheduled, on the prefill side
    age: float                          # seconds from arrival to export
    num_pages: int                      # pages sent: those covering the KV tokens (bucket-padded on the wire)

    @property
    def num_kv_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) - 1


class PageSource(Protocol):
    """Where the decode side gets the pages from."""
    nbytes: int

    def fetch(self, place: Callable[[list], list]) -> list:
        """The pages' arrays on the receiver, placed by `place` (asynchronous: poll is_ready)."""

    def failed(self) -> None:
        """The fetched arrays failed or timed out (e.g. forget a broken connection)."""


@dataclasses.dataclass(frozen=True)
class LocalPages:
    """Pages on another mesh of this process: fetching is jax.device_put onto the receiver's layout."""
    arrays: tuple
    nbytes: int

    def fetch(self, place):
        return place(list(self.arrays))

    def failed(self) -> None:
        pass


class Lease:
    """The prefill side's hold on a request's pages. `end(received)` runs the release callback once,
    from any thread; later calls do nothing and return False."""

    def __init__(self, request_id: str, release: Callable[[str, bool], None]):
        self.request_id, self._release = request_id, release
        self._lock = threading.Lock()
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def end(self, received: bool) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._ended = True
        self._release(self.request_id, received)
        return True


@dataclasses.dataclass(frozen=True)
class KVExport:
    state: RequestState
    kv_spec: str        # the prefill pool's format digest (page_transfer.kv_spec); must equal the receiver's
    pages: PageSource
    lease: Lease
    exported_at: float = dataclasses.field(default_factory=time.monotonic)
    prefill_time: float = 0.0  # seconds of prefill compute: first scheduled to export


@dataclasses.dataclass
class Incoming:
    """A decode engine's import in flight: the fetched arrays and when it gives up on them."""
    export: KVExport
    arrays: list
    deadline: float
    started: float = dataclasses.field(default_factory=time.monotonic)
    arrived: bool = False

    def poll(self) -> str:
        """"ready" | "waiting" | "failed" (the transfer raised) | "timeout"."""
        try:
            if all(a.is_ready() for a in self.arrays):
                for a in self.arrays:  # ready: returns at once, or raises what the transfer hit
                    a.block_until_ready()
                return "ready"
        except Exception:  # noqa: BLE001 - a failed transfer surfaces here, before any step uses it
            return "failed"
        return "timeout" if time.monotonic() > self.deadline else "waiting"
