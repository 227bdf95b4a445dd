"""``bench/copy_ledger.py`` gives PostgreSQL the same ledger as the SQLite source: the
same records in the same order, the same chain head, and the same bytes per record."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.copy_ledger import copy_ledger, open_without_hsm
from bench.verify import append, open_bench_ledger

pytestmark = pytest.mark.postgres


def test_a_copied_ledger_has_the_same_records_and_head(tmp_path: Path, pg_url: str) -> None:
    src = open_bench_ledger(tmp_path / "src")
    append(src, 1200, tree=True)
    src.close()
    source = open_without_hsm(tmp_path / "src", None)
    target = open_without_hsm(tmp_path / "dst", pg_url)
    try:
        assert copy_ledger(source, target, batch=500) == 1200
        assert target.db.head() == source.db.head() and target.db.head_seq() == 1200
        a, b = source.db.read_records(0, 2000), target.db.read_records(0, 2000)
        assert [r.data for r in a] == [r.data for r in b]
        with pytest.raises(ValueError, match="not empty"):
            copy_ledger(source, target)
    finally:
        source.close()
        target.close()
