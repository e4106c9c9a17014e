"""AsyncEngine: the Engine driven by one background thread, streamed to asyncio callers.

The Engine is not thread-safe, so exactly one thread (the engine thread) ever touches it. Callers
hand it work as commands (`submit(fn)` runs fn(engine) between two steps); the thread runs every
queued command, then one `engine.step()` while any request is unfinished, else sleeps on a
condition until a command arrives. Each step's deltas go to their request's asyncio.Queue through
`loop.call_soon_threadsafe`, so consumers may live on any event loop.

A stream that stops early (break, cancellation, a closed loop) aborts its request, freeing its
pages. An exception in `engine.step` is delivered to every open stream, whose requests are aborted,
and the thread keeps serving.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from typing import AsyncIterator, Callable

from jaxserve.engine.engine import Engine
from jaxserve.engine.outputs import RequestDelta
from jaxserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
LEASE_CHECK_S = 0.5  # how often an idle engine thread looks for expired export leases


class EngineDeadError(RuntimeError):
    """The AsyncEngine is shut down (or shutting down) and takes no more work."""


class _Stream:
    """Where one request's deltas go: a queue owned by the consumer's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> bool:
        """Thread-safe; False when the consumer's loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # loop closed
            return False


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._commands: collections.deque = collections.deque()  # (fn, concurrent Future)
        self._stopping = False
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self.num_step_errors = 0
        self._next_lease_check = 0.0
        engine.run_soon = self._run_soon  # leases of exported pages end from other threads
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    # --- public API ---------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Runs fn(engine) on the engine thread between steps; the Future holds its result or error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise EngineDeadError("the AsyncEngine is shut down")
            self._commands.append((fn, future))
            self._cv.notify()
        return future

    async def call(self, fn: Callable[[Engine], object]):
        """submit(fn), awaited."""
        return await asyncio.wrap_future(self.submit(fn))

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       export: bool = False) -> AsyncIterator[RequestDelta]:
        """Adds the request and yields its deltas until the finished one (or, with export, the one
        carrying its KVExport). Add errors (e.g. InvalidRequestError) raise here. Leaving the loop
        early aborts the request."""
        stream = _Stream(asyncio.get_running_loop())

        def add(engine: Engine) -> str:
            rid = engine.add_request(prompt, params, request_id, priority, export=export)
            self._streams[rid] = stream  # registered before any step can produce a delta
            return rid

        rid = await self._opened(self.submit(add))
        async for delta in self._deltas(rid, stream):
            yield delta

    async def open_import(self, export) -> AsyncIterator[RequestDelta] | None:
        """Imports a prefilled request (jaxserve.engine.handoff.KVExport): its delta stream, or None
        when this engine has no seat or pages for it now (nothing changed)."""
        stream = _Stream(asyncio.get_running_loop())

        def add(engine: Engine) -> str | None:
            if not engine.import_request(export):
                return None
            self._streams[export.state.request_id] = stream
            return export.state.request_id

        rid = await self._opened(self.submit(add))
        return None if rid is None else self._deltas(rid, stream)

    async def _opened(self, future: concurrent.futures.Future):
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # Cancelling the wrapper cancels the command unless it already ran; if it did, undo it.
            future.add_done_callback(
                lambda f: f.cancelled() or f.exception() is not None or f.result() is None
                or self._abort_later(f.result()))
            raise

    async def _deltas(self, rid: str, stream: _Stream) -> AsyncIterator[RequestDelta]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine thread already aborted it
                    raise item
                finished = item.finished or item.export is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort_later(rid)

    async def abort(self, request_id: str) -> bool:
        """Aborts a waiting or running request; its stream ends with an "abort" delta.
        False when the id is unknown or already finished."""
        return await self.call(lambda engine: engine.abort(request_id))

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stops the engine thread. Pending requests are aborted; their streams get a final
        "abort" delta. Idempotent."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- engine thread ------------------------------------------------------------------------
    def _run_soon(self, fn: Callable[[], object]) -> None:
        try:
            self.submit(lambda engine: fn())
        except EngineDeadError:
            pass  # the engine is gone, and its pages with it

    def _abort_later(self, rid: str) -> None:
        """Fire-and-forget abort from any thread; stops delivering to the stream at once."""
        def drop(engine: Engine) -> bool:
            self._streams.pop(rid, None)
            return engine.abort(rid)

        try:
            self.submit(drop)
        except EngineDeadError:
            pass  # shutdown aborts everything anyway

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._commands or self._stopping or self._has_work()):
                    if not self._cv.wait(timeout=LEASE_CHECK_S):
                        break  # exported pages' leases expire even while idle
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            for fn, future in commands:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
            if stopping:
                self._drain()
                return
            self._expire_leases()
            if self._has_work():
                self._step()

    def _expire_leases(self) -> None:
        """At most once per LEASE_CHECK_S, whatever wakes the thread (steps, or commands such as
        stats polls, which would otherwise keep an idle wait from ever timing out)."""
        now = time.monotonic()
        if now >= self._next_lease_check:
            self._next_lease_check = now + LEASE_CHECK_S
            try:
                self.engine.expire_exports()
            except Exception:  # noqa: BLE001
                log.exception("expiring exported pages failed")

    def _has_work(self) -> bool:
        try:
            return self.engine.has_unfinished()
        except Exception:  # noqa: BLE001 - never let the loop die
            log.exception("engine.has_unfinished failed")
            return False

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as e:  # noqa: BLE001 - delivered to every stream below
            self.num_step_errors += 1
            log.exception("engine step failed; failing %d open streams", len(self._streams))
            self._fail_all(e)
            return
        self._deliver(deltas)

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        """Hands a step's deltas to their streams: one thread-safe wake-up per event loop per step,
        not one per request (64 streams would mean 64 self-pipe writes and loop wake-ups)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue  # added through submit(), or its consumer left
            if delta.finished or delta.export is not None:
                del self._streams[delta.request_id]
            batches.setdefault(stream.loop, []).append((stream.queue, delta))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumers' loop is closed: nobody will read these
                for _, delta in items:
                    if not delta.finished:
                        self._streams.pop(delta.request_id, None)
                        self.engine.abort(delta.request_id)

    def _fail_all(self, error: Exception) -> None:
        """After a failed step: every open stream gets the error; every request is aborted so the
        loop does not spin on a broken batch."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)
        self._abort_everything()
        try:
            self.engine.step()  # flushes the abort deltas (nothing is left to schedule)
        except Exception:  # noqa: BLE001
            log.exception("engine step after failure also failed")

    def _abort_everything(self) -> None:
        """One by one, so a request whose abort fails (after a failed step) leaves the others aborted."""
        try:
            request_ids = self.engine.unfinished_request_ids()
        except Exception:  # noqa: BLE001
            log.exception("listing the unfinished requests failed")
            return
        for rid in request_ids:
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001
                log.exception("abort of %s failed", rid)

    def _drain(self) -> None:
        """Shutdown: abort everything and deliver the final "abort" deltas."""
        self._abort_everything()
        try:
            deltas = self.engine.step()
        except Exception as e:  # noqa: BLE001
            self._fail_all(e)
            return
        self._deliver(deltas)
        for stream in self._streams.values():  # should be none left; never leave a consumer hanging
            stream.put(EngineDeadError("the AsyncEngine shut down"))
        self._streams.clear()
