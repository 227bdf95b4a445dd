"""The usage index stores awkward text exactly, on both backends: on PostgreSQL its
rows travel by COPY (tabs, newlines, backslashes, ``\\N`` and non-ASCII must survive
the escaping), on SQLite as bound parameters or a serialized batch."""

from __future__ import annotations

import orjson
import pytest

from ledger.service import Caller, KeyLedger
from projections.usage import (
    COLUMNS,
    TABLE_COLUMNS,
    Filters,
    UsageIndex,
    name_number,
    prepare,
)

pytestmark = pytest.mark.softhsm

AWKWARD = {
    "tab": "a\tb",
    "lines": "x\ny\r\nz",
    "back\\slash": "c:\\dir\\",
    "null-marker": "\\N",
    "unicode": "é☃ 東京",
}


def test_rows_for_postgresql_carry_nul_as_the_replacement_character() -> None:
    event = {
        "topic": "ledger.domain.model:ApiCall.Failed",
        "timestamp": "2026-11-01T00:00:00+00:00",
        "call": {"operation": "Encrypt", "user_agent": "agent\x00x", "principal": "p\x00"},
        "request": {"keyId": "alias/a\x00b", "encryptionContext": {"k\x00": "v\x00"}},
    }
    plain = {**event, "call": {"operation": "Encrypt", "user_agent": "agent"}, "request": {}}
    records = [(1, orjson.dumps(event)), (2, orjson.dumps(plain))]
    rows, pairs, _ = prepare(records, for_postgres=True)
    assert "\x00" not in repr(rows) + repr(pairs)
    assert rows[0][COLUMNS.index("user_agent")] == "agent\ufffdx"
    assert rows[0][COLUMNS.index("key_sent")] == "alias/a\ufffdb"
    assert pairs == [("2:k\ufffd=v\ufffd", 1)]
    # the number of the principal as stored (the names table holds that text)
    assert rows[0][TABLE_COLUMNS.index("principal_no")] == name_number("p\ufffd")
    assert rows[1] == prepare(records)[0][1]  # rows without NUL as they are
    # SQLite keeps the exact text
    assert prepare(records)[0][0][COLUMNS.index("user_agent")] == "agent\x00x"


def test_awkward_context_and_agent_round_trip_through_the_index(ledger: KeyLedger) -> None:
    root = Caller(principal="arn:aws:iam::111122223333:root")
    arn = ledger.create_key(caller=root)["KeyMetadata"]["Arn"]
    agent = "agent\twith\ttabs\\and\nlines"
    caller = Caller(principal=root.principal, source_ip="127.0.0.1", user_agent=agent)
    for _ in range(3):
        ledger.encrypt(caller=caller, key_id=arn, plaintext=b"x", encryption_context=AWKWARD)
    index = UsageIndex(ledger.db)
    for build in (index.catch_up, index.rebuild):
        build()
        for k, v in AWKWARD.items():
            rows = index.trail(Filters(key_arns=[arn], context=[(k, v)]))
            assert len(rows) == 3, (k, v)
            assert all(orjson.loads(r["context"]) == AWKWARD for r in rows)
            assert all(r["user_agent"] == agent for r in rows)
        # A value that only differs in escaping matches nothing.
        assert index.trail(Filters(key_arns=[arn], context=[("null-marker", "N")])) == []


def test_nul_in_a_context_or_key_id_is_indexed_and_found(ledger: KeyLedger) -> None:
    """PostgreSQL text cannot hold NUL: one caller's context value or KeyId with a NUL
    must not stop the index (and every forensic query) from catching up."""
    from ledger.errors import KeyLedgerError
    from projections.catalog import KeyCatalog
    from projections.views import HistoryViews

    root = Caller(principal="arn:aws:iam::111122223333:root")
    arn = ledger.create_key(caller=root)["KeyMetadata"]["Arn"]
    ctx = {"k\x00ey": "va\x00lue"}
    ledger.encrypt(caller=root, key_id=arn, plaintext=b"x", encryption_context=ctx)
    with pytest.raises(KeyLedgerError):
        ledger.encrypt(caller=root, key_id="alias/no\x00such", plaintext=b"x")
    ledger.encrypt(caller=root, key_id=arn, plaintext=b"y")
    index = UsageIndex(ledger.db)
    index.catch_up()
    assert index.position == ledger.db.head_seq()
    rows = index.trail(Filters(context=[("k\x00ey", "va\x00lue")]))
    assert [orjson.loads(r["context"]) for r in rows] == [ctx]
    assert len(index.trail(Filters(key_sent="alias/no\x00such"))) == 1
    assert index.trail(Filters(context=[("k\x00ey", "other")])) == []
    KeyCatalog(ledger.db).catch_up()
    HistoryViews(ledger.db).catch_up()


def test_rows_formatted_for_copy_by_workers_equal_rows_written_by_the_writer(
    ledger: KeyLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a rebuild's workers send rows already in COPY's binary format, on
    SQLite in a serialized database; the tables must equal those written row by row
    (tabs, backslashes, ``\\N``, NUL)."""
    import projections.usage as usage
    from ledger.persistence import CopyBinary, SQLiteBatch

    root = Caller(principal="arn:aws:iam::111122223333:root")
    arn = ledger.create_key(caller=root)["KeyMetadata"]["Arn"]
    agent = "agent\twith\\N\nlines"
    caller = Caller(principal=root.principal, source_ip="127.0.0.1", user_agent=agent)
    for i in range(5):
        ctx = {**AWKWARD, "n\x00ul": f"v\x00{i}"}
        ledger.encrypt(caller=caller, key_id=arn, plaintext=b"x", encryption_context=ctx)
    index = UsageIndex(ledger.db, batch_size=2)
    index.rebuild()
    serial = index.snapshot()
    monkeypatch.setattr(usage, "PARALLEL_MIN_RECORDS", 0)
    monkeypatch.setattr(usage, "REBUILD_BATCH", 2)
    monkeypatch.setattr(usage.os, "cpu_count", lambda: 2)
    sent: list[type] = []
    write = UsageIndex._write

    def spy(self: UsageIndex, c: object, prepared: usage.Batch, lo: int, claimed: int) -> None:
        sent.append(type(prepared[0]))
        write(self, c, prepared, lo, claimed)  # type: ignore[arg-type]

    monkeypatch.setattr(UsageIndex, "_write", spy)
    assert index.rebuild() == ledger.db.head_seq()
    assert index.snapshot() == serial
    assert len(index.trail(Filters(key_arns=[arn], context=[("n\x00ul", "v\x003")]))) == 1
    # The formatted paths are the ones taken
    assert set(sent) == ({CopyBinary} if ledger.db.is_postgres else {SQLiteBatch})


def test_a_sqlite_batch_is_attached_for_one_transaction_and_detached_after_a_failure(
    ledger: KeyLedger,
) -> None:
    from ledger.persistence import BATCH_SCHEMA, sqlite_batch

    rows = [(1, "a\x00b\tc"), (2, None), (3, "é☃")]
    batch = sqlite_batch([("t", "seq INTEGER PRIMARY KEY, v TEXT", rows)])
    assert batch is not None
    if ledger.db.is_postgres:
        with pytest.raises(TypeError), ledger.db.transaction_with(batch):
            pass
        return
    with ledger.db.transaction_with(batch) as c:
        c.execute(f"CREATE TABLE kl_probe AS SELECT * FROM {BATCH_SCHEMA}.t")
    with pytest.raises(RuntimeError), ledger.db.transaction_with(batch) as c:
        c.execute(f"INSERT INTO kl_probe SELECT seq + 3, v FROM {BATCH_SCHEMA}.t")
        raise RuntimeError("stop")  # rolled back, and the batch detached all the same
    for _ in range(3):  # attaching again on the pooled connection works
        with ledger.db.transaction_with(batch) as c:
            got = c.select_values("SELECT seq, v FROM kl_probe ORDER BY seq")
            assert [tuple(r) for r in got] == rows
    with ledger.db.transaction(commit=False) as c:
        attached = [r[1] for r in c.select_values("PRAGMA database_list")]
    assert BATCH_SCHEMA not in attached


def test_copy_rows_is_binary_when_the_types_fit_and_text_otherwise(ledger: KeyLedger) -> None:
    from ledger.persistence import CopyBinary, CopyData, copy_rows

    fits = copy_rows([(1, "a\tb\\N"), (2, None)], ("int8", "text"))
    other = copy_rows([(3, 5), (4, True)], ("int8", "text"))  # not text: formatted as text
    assert type(fits) is CopyBinary and type(other) is CopyData
    with ledger.db.transaction(commit=False) as c:
        if not ledger.db.is_postgres:
            with pytest.raises(TypeError):
                c.insert_new("t", ("seq", "v"), fits)
            return
        c.execute("CREATE TEMP TABLE kl_copy_probe (seq BIGINT, v TEXT)")
        c.insert_new("kl_copy_probe", ("seq", "v"), fits)
        c.insert_new("kl_copy_probe", ("seq", "v"), other)
        got = [tuple(r) for r in c.select_values("SELECT seq, v FROM kl_copy_probe ORDER BY seq")]
    # As Copy.write_row writes them: str(5), and a bool as PostgreSQL's text for it
    assert got == [(1, "a\tb\\N"), (2, None), (3, "5"), (4, "t")]
