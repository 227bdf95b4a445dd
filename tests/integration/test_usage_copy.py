"""The usage index stores awkward text exactly, on both backends: on PostgreSQL its
rows travel as COPY text (tabs, newlines, backslashes, ``\\N`` and non-ASCII must
survive the escaping), on SQLite as bound parameters."""

from __future__ import annotations

import orjson
import pytest

from ledger.service import Caller, KeyLedger
from projections.usage import Filters, UsageIndex, copy_text

pytestmark = pytest.mark.softhsm

AWKWARD = {
    "tab": "a\tb",
    "lines": "x\ny\r\nz",
    "back\\slash": "c:\\dir\\",
    "null-marker": "\\N",
    "unicode": "é☃ 東京",
}


def test_copy_text_escapes_what_copy_would_misread() -> None:
    text = copy_text([(1, None, "a\tb\\N\n\r", "é")])
    assert text == "1\t\\N\ta\\tb\\\\N\\n\\r\té\n".encode()
    assert copy_text([]) == b""


def test_copy_text_escapes_repeated_values_the_same_in_every_row() -> None:
    # Values escaped once per call and reused: each row must still say its own values.
    rows = [(1, "a\tb", None, "x"), (2, "a\tb", "x", None), (3, "x", True, 1), (4, 1, "1", 1.5)]
    lines = copy_text(rows).decode().splitlines()
    assert lines == [
        "1\ta\\tb\t\\N\tx",
        "2\ta\\tb\tx\t\\N",
        "3\tx\tTrue\t1",
        "4\t1\t1\t1.5",
    ]


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
