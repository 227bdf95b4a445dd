"""Group commit: concurrent callers share one storing transaction.

The first waiting caller becomes the leader, stores every pending object in one
``save`` and wakes the others; while it writes, new callers queue for the next
batch. Each caller returns only after the transaction holding its event committed,
and gets the same exception if that transaction failed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class _Item:
    __slots__ = ("done", "error", "obj")

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.done = False
        self.error: BaseException | None = None


class GroupCommitter:
    """Batches ``save(*objs)`` calls from many threads (at most ``max_batch`` each)."""

    def __init__(self, save: Callable[..., Any], *, max_batch: int = 256) -> None:
        self._save = save
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        self._writing = False

    def commit(self, obj: Any) -> None:
        """Store ``obj``'s pending events durably; re-raise the batch's failure."""
        item = _Item(obj)
        with self._cond:
            self._pending.append(item)
            while not item.done:
                if self._writing:
                    self._cond.wait()
                    continue
                self._writing = True
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                self._cond.release()
                error: BaseException | None = None
                try:
                    self._save(*(i.obj for i in batch))
                except BaseException as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                for i in batch:
                    i.error = error
                    i.done = True
                self._writing = False
                self._cond.notify_all()
        if item.error is not None:
            raise item.error
