"""api.committer.AsyncCommitter: records queued from the event loop are stored by one
thread in groups, each waiter learns its group's outcome, and stop stores what is
queued before the thread ends."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from api.committer import AsyncCommitter, LoopCommitter


class Recorder:
    """A ledger whose ``save`` keeps each call's records (optionally slow or failing)."""

    def __init__(self, *, delay: float = 0.0, fail: BaseException | None = None) -> None:
        self.saves: list[tuple[Any, ...]] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.fail = fail

    def save(self, *records: Any) -> None:
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.saves.append(records)


def test_records_queued_while_a_save_runs_share_the_next_one() -> None:
    ledger = Recorder(delay=0.2)
    committer = AsyncCommitter()

    async def main() -> None:
        first = committer.commit(ledger, ["r0"])
        await asyncio.sleep(0.05)  # the committer is inside the first, slow save
        rest = [committer.commit(ledger, [f"r{i}a", f"r{i}b"]) for i in range(1, 40)]
        await asyncio.gather(first, *rest)

    asyncio.run(main())
    committer.stop()
    assert ledger.saves[0] == ("r0",)
    assert len(ledger.saves) == 2  # 39 requests, 78 records, one transaction
    assert sorted(ledger.saves[1]) == sorted(f"r{i}{s}" for i in range(1, 40) for s in "ab")
    assert ledger.threads == {"keyledger-committer"}


def test_every_waiter_of_a_failed_save_gets_its_exception() -> None:
    ledger = Recorder(fail=OSError("disk full"))
    committer = AsyncCommitter()

    async def main() -> list[BaseException | None]:
        futures = [committer.commit(ledger, [i]) for i in range(5)]
        return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = asyncio.run(main())
    committer.stop()
    assert all(isinstance(o, OSError) and str(o) == "disk full" for o in outcomes)


def test_records_of_two_ledgers_go_to_their_own_save() -> None:
    first, second = Recorder(), Recorder()
    committer = AsyncCommitter()

    async def main() -> None:
        await asyncio.gather(
            committer.commit(first, ["a1"]),
            committer.commit(second, ["b1"]),
            committer.commit(first, ["a2"]),
        )

    asyncio.run(main())
    committer.stop()
    assert sorted(r for s in first.saves for r in s) == ["a1", "a2"]
    assert [r for s in second.saves for r in s] == ["b1"]


def test_nothing_to_store_completes_at_once_without_a_thread() -> None:
    committer = AsyncCommitter()

    async def main() -> None:
        await asyncio.wait_for(committer.commit(Recorder(), []), 1)

    asyncio.run(main())
    assert committer._thread is None  # never started


def test_stop_stores_what_is_queued_then_ends_the_thread() -> None:
    ledger = Recorder(delay=0.05)
    committer = AsyncCommitter()

    async def main() -> None:
        for i in range(10):
            committer.commit(ledger, [i])  # nobody waits: shutdown must still store them
        await asyncio.sleep(0)

    asyncio.run(main())
    thread = committer._thread
    committer.stop()
    assert sorted(r for s in ledger.saves for r in s) == list(range(10))
    assert thread is not None and not thread.is_alive()


@pytest.mark.parametrize("timeout", [0.05])
def test_a_waiter_that_gave_up_is_left_alone(timeout: float) -> None:
    ledger = Recorder(delay=0.2)
    committer = AsyncCommitter()

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(committer.commit(ledger, ["late"]), timeout)
        await asyncio.sleep(0.3)  # the save finishes; settling a cancelled future is skipped

    asyncio.run(main())
    committer.stop()
    assert ledger.saves == [("late",)]


def test_a_transaction_waits_briefly_for_requests_still_in_flight() -> None:
    ledger = Recorder()
    in_flight = [3]
    committer = AsyncCommitter(delay=1.0, in_flight=lambda: in_flight[0])

    async def main() -> None:
        futures = []
        for i in range(3):  # three requests, each committing 20 ms after the last
            futures.append(committer.commit(ledger, [i]))
            await asyncio.sleep(0.02)
        await asyncio.gather(*futures)

    asyncio.run(main())
    committer.stop()
    assert ledger.saves == [(0, 1, 2)]  # one transaction: it waited for its siblings


def test_a_lone_request_is_stored_without_waiting() -> None:
    ledger = Recorder()
    committer = AsyncCommitter(delay=5.0, in_flight=lambda: 1)

    async def main() -> float:
        started = time.monotonic()
        await committer.commit(ledger, ["only"])
        return time.monotonic() - started

    assert asyncio.run(main()) < 1.0
    committer.stop()
    assert ledger.saves == [("only",)]


def test_the_wait_for_siblings_is_bounded_by_the_delay() -> None:
    ledger = Recorder()
    committer = AsyncCommitter(delay=0.05, in_flight=lambda: 99)  # siblings never come

    async def main() -> float:
        started = time.monotonic()
        await committer.commit(ledger, ["first"])
        return time.monotonic() - started

    waited = asyncio.run(main())
    committer.stop()
    assert 0.04 <= waited < 1.0
    assert ledger.saves == [("first",)]


# ------------------------------------------------------------------ LoopCommitter


def test_loop_committer_stores_one_pass_of_the_loop_in_one_save_on_the_loop() -> None:
    ledger = Recorder()
    committer = LoopCommitter()

    async def main() -> None:
        futures = [committer.commit(ledger, [i, -i]) for i in range(1, 6)]  # one pass
        await asyncio.gather(*futures)
        await committer.commit(ledger, ["next"])  # a later pass: a transaction of its own

    asyncio.run(main())
    assert ledger.saves == [(1, -1, 2, -2, 3, -3, 4, -4, 5, -5), ("next",)]
    assert ledger.threads == {threading.current_thread().name}  # asyncio.run's loop


def test_loop_committer_fails_every_waiter_of_a_failed_save_and_keeps_going() -> None:
    failing, fine = Recorder(fail=OSError("disk full")), Recorder()
    committer = LoopCommitter()

    async def main() -> list[Any]:
        outcomes = await asyncio.gather(
            committer.commit(failing, ["a"]),
            committer.commit(failing, ["b"]),
            committer.commit(fine, ["c"]),
            return_exceptions=True,
        )
        await committer.commit(fine, ["d"])
        return outcomes

    a, b, c = asyncio.run(main())
    assert isinstance(a, OSError) and isinstance(b, OSError) and c is None
    assert fine.saves == [("c",), ("d",)]


def test_loop_committer_completes_nothing_to_store_at_once() -> None:
    ledger = Recorder()

    async def main() -> bool:
        future = LoopCommitter().commit(ledger, [])
        return future.done()

    assert asyncio.run(main())
    assert ledger.saves == []
