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
