"""``bench/copy_ledger.py`` gives PostgreSQL the same ledger as the SQLite source: the
same records in the same order, the same chain head, and the same bytes per record."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.copy_ledger import copy_ledger, open_without_hsm
from bench.generate import START, generate
from bench.verify import append, open_bench_ledger
from ledger.bootstrap import open_ledger
from ledger.chain import verify_chain
from ledger.clock import FixedClock
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.settings import Settings

pytestmark = pytest.mark.postgres


def test_a_copied_ledger_has_the_same_records_and_head(tmp_path: Path, pg_url: str) -> None:
    src = open_bench_ledger(tmp_path / "src")
    append(src, 1200, tree=True)
    src.close()
    source = open_without_hsm(tmp_path / "src", None)
    target = open_without_hsm(tmp_path / "dst", pg_url)
    try:
        assert copy_ledger(source, target, batch=300) == 1200
        assert target.db.head() == source.db.head() and target.db.head_seq() == 1200
        a, b = source.db.read_records(0, 2000), target.db.read_records(0, 2000)
        assert [r.data for r in a] == [r.data for r in b]
        with pytest.raises(ValueError, match="not empty"):
            copy_ledger(source, target)
    finally:
        source.close()
        target.close()


@pytest.mark.softhsm
def test_batches_of_mixed_events_append_on_postgresql_as_written(
    tmp_path: Path, pg_url: str, softhsm_keystore: Pkcs11KeyStore
) -> None:
    """Batches of hundreds of mixed events (lifecycle, aliases, grants, calls) in one
    PostgreSQL transaction each: the recorder's pipelined inserts and the chain, key
    chain and tree queries share the transaction (a fetch once read another
    statement's result there)."""
    clock = FixedClock(START)
    led = open_ledger(Settings(data_dir=tmp_path / "src"), keystore=softhsm_keystore, clock=clock)
    generate(led, clock, events=3000, keys=12, principals=6, days=2, seed=5)
    led.close()
    source = open_without_hsm(tmp_path / "src", None)
    target = open_without_hsm(tmp_path / "dst", pg_url)
    try:
        assert copy_ledger(source, target, batch=300) == source.db.head_seq()
        assert target.db.head() == source.db.head()
        result = verify_chain(target.db.iter_chain(), target.db.iter_events())
        assert result.count == source.db.head_seq()
    finally:
        source.close()
        target.close()
