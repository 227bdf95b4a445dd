"""Copy a ledger record for record into another database (for benchmarks).

    python bench/copy_ledger.py --from-data-dir DIR [--from-database-url URL]
        --to-database-url URL [--to-data-dir DIR] [--batch 500]

Reads the source's stored events in log order and appends them through the target's
recorder, which computes the chain, per-key chains and Merkle tree at append as for any
write. The stored bytes are the same, so the two ledgers end with the same head hash
(checked, and printed). ``bench/forensics.py`` uses this to give PostgreSQL the ledger
that ``bench/generate.py`` wrote into SQLite: generating a million events through the
service a second time would take most of an hour on two cores and measure nothing new.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eventsourcing.persistence import StoredEvent

from ledger.service import KeyLedger


def open_without_hsm(data_dir: Path, url: str | None) -> KeyLedger:
    from cli.context import CliContext
    from ledger.settings import Settings

    return CliContext(settings=Settings(data_dir=data_dir, database_url=url)).ledger_without_hsm


def copy_ledger(source: KeyLedger, target: KeyLedger, batch: int = 500) -> int:
    """Append every stored event of ``source`` to the empty ``target``, in order; the
    number copied. Raises ValueError if the target is not empty or the heads differ."""
    if target.db.head_seq():
        raise ValueError("the target ledger is not empty")
    recorder = target.recorder
    pending: list[StoredEvent] = []
    n = 0
    for row in source.db.iter_events(page=batch):
        pending.append(
            StoredEvent(
                originator_id=UUID(str(row["originator_id"])),
                originator_version=int(row["originator_version"]),
                topic=str(row["topic"]),
                state=bytes(row["state"]),
            )
        )
        if len(pending) >= batch:
            recorder.insert_events(pending)
            n += len(pending)
            pending = []
    if pending:
        recorder.insert_events(pending)
        n += len(pending)
    if source.db.head() != target.db.head():
        raise ValueError("the copy's head differs from the source's")
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from-data-dir", type=Path, required=True)
    p.add_argument("--from-database-url")
    p.add_argument("--to-data-dir", type=Path)
    p.add_argument("--to-database-url", required=True)
    p.add_argument("--batch", type=int, default=500)
    a = p.parse_args()
    source = open_without_hsm(a.from_data_dir, a.from_database_url)
    target = open_without_hsm(a.to_data_dir or a.from_data_dir, a.to_database_url)
    try:
        t0 = time.perf_counter()
        n = copy_ledger(source, target, a.batch)
        dt = time.perf_counter() - t0
        seq, head = target.db.head()
        print(f"copied {n:,} records in {dt:.0f} s ({n / dt:,.0f}/s); head {seq} {head.hex()}")
    finally:
        source.close()
        target.close()


if __name__ == "__main__":
    main()
