"""Group commit for requests the event loop runs itself.

The inline operations (``api.app.INLINE_OPERATIONS``: cryptographic calls and reads of
one key) run on the event loop with their call records deferred
(``ledger.service.deferred_records``); the loop hands the records to a committer and
awaits the returned future.

``LoopCommitter`` (SQLite) stores the records of one pass of the loop in one ``save``
from a callback. ``AsyncCommitter`` (PostgreSQL): one thread stores everything queued
since its last transaction in one ``save`` and resolves the futures on the loop, one
thread hop per batch instead of two per request. While more requests are in flight
than a batch holds, it waits up to ``COMMIT_DELAY`` for them (as PostgreSQL's
commit_delay waits for commit_siblings); a lone request never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_STOP = object()
MAX_BATCH = 256
COMMIT_DELAY = 0.004  # seconds a transaction may wait for requests still in flight


class AsyncCommitter:
    """Commits record batches from a thread of its own; started on first use."""

    def __init__(
        self,
        *,
        max_batch: int = MAX_BATCH,
        delay: float = COMMIT_DELAY,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._delay = delay
        self._in_flight = in_flight
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def commit(self, ledger: Any, records: Sequence[Any]) -> asyncio.Future[None]:
        """A future (of the running loop) that completes when ``records`` are stored by
        ``ledger.save(*records)``, or fails with that save's exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not records:
            future.set_result(None)
            return future
        self._start()
        self._queue.put((ledger, records, loop, future))
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Store what is queued, then end the thread (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="keyledger-committer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            deadline = time.monotonic() + self._delay
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    # Other requests in flight will want this transaction too: wait
                    # for them, a little (PostgreSQL's commit_delay and siblings).
                    left = deadline - time.monotonic()
                    if self._in_flight is None or left <= 0 or self._in_flight() <= len(batch):
                        break
                    try:
                        more = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                if more is _STOP:
                    stopping = True
                    break
                batch.append(more)
            self._store(batch)

    @staticmethod
    def _store(batch: list[Any]) -> None:
        for items, error in _save_by_ledger(batch):
            by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list[Any]]] = {}
            for _, _, loop, future in items:
                by_loop.setdefault(id(loop), (loop, []))[1].append(future)
            for loop, futures in by_loop.values():  # one wake-up per loop and batch
                # A closed loop: nobody waits any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, futures, error)


def _save_by_ledger(
    batch: list[Any],
) -> Iterator[tuple[list[Any], BaseException | None]]:
    """Store the records of ``batch`` items ``(ledger, records, ...)``, one transaction
    per ledger (a dev reset may swap the ledger); yields each group of items with its
    save's exception, which every waiter of the group gets."""
    groups: dict[int, list[Any]] = {}
    for item in batch:
        groups.setdefault(id(item[0]), []).append(item)
    for items in groups.values():
        error: BaseException | None = None
        try:
            items[0][0].save(*(r for item in items for r in item[1]))
        except BaseException as exc:
            error = exc
        yield items, error


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():  # the request timed out meanwhile
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class LoopCommitter:
    """Commits on the event loop itself: the records of the requests run in one pass of
    the loop share one transaction, stored by a callback scheduled after them; no thread.

    For SQLite, where a commit is a local write and fsync: the loop waiting on it costs
    less than a committer thread contending with it for the GIL (4 to 8% more calls/s
    at 16 concurrent Encrypts, measured alternately). For PostgreSQL, whose commit is a
    network round trip, ``AsyncCommitter`` keeps the loop working meanwhile (20% more).
    Same interface as ``AsyncCommitter``.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Any, Sequence[Any], asyncio.Future[None]]] = []

    def commit(self, ledger: Any, records: Sequence[Any]) -> asyncio.Future[None]:
        """A future that completes when ``records`` are stored by ``ledger.save`` (from a
        callback of the running loop), or fails with that save's exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not records:
            future.set_result(None)
            return future
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((ledger, records, future))
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Nothing to end: a scheduled flush runs with the loop."""

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        for items, error in _save_by_ledger(batch):
            _settle([item[-1] for item in items], error)


__all__ = ["AsyncCommitter", "LoopCommitter"]
