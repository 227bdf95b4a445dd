"""Verification of the global hash chain over the stored log.

Walks every stored event in log order beside its chain row and checks: contiguous
``seq``; each ``prev`` equals the previous record's hash; each record hash equals
SHA-256 of the stored bytes; the originator id, version and topic columns agree with
the bytes; no stored event lacks a chain row and no chain row lacks its event.
Verifiers hash stored bytes; they never re-serialise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from ledger.errors import TamperError
from ledger.records import GENESIS


@dataclass(frozen=True)
class VerifyResult:
    count: int
    head: bytes

    @property
    def head_hex(self) -> str:
        return self.head.hex()


def _next(it: Iterator[Any]) -> Any:
    return next(it, None)


def verify_chain(
    chain_rows: Iterable[Any],
    event_rows: Iterable[Any],
    *,
    expect_head: bytes | None = None,
    expect_count: int | None = None,
) -> VerifyResult:
    """Verify the chain; return the count and head hash.

    ``chain_rows`` yield ``seq, notification_id, record_hash, prev`` in seq order;
    ``event_rows`` yield ``nid, originator_id, originator_version, topic, state`` in
    log order. Raises TamperError naming the first bad 1-based position.
    """
    chain_it, event_it = iter(chain_rows), iter(event_rows)
    prev, count = GENESIS, 0
    c, e = _next(chain_it), _next(event_it)
    while c is not None:
        pos = count + 1
        seq = int(c["seq"])
        if seq != pos:
            raise TamperError(pos, f"chain sequence jumps to {seq} (records missing)")
        if bytes(c["prev"]) != prev:
            raise TamperError(pos, "prev link does not match the previous record's hash")
        nid = int(c["notification_id"])
        if e is None or int(e["nid"]) > nid:
            raise TamperError(pos, "stored event is missing (deleted)")
        if int(e["nid"]) < nid:
            raise TamperError(pos, "stored event without a chain entry (inserted)")
        state = bytes(e["state"])
        digest = hashlib.sha256(state).digest()
        if digest != bytes(c["record_hash"]):
            raise TamperError(pos, "record hash does not match the stored bytes (modified)")
        _check_columns(pos, e, state)
        prev = digest
        count = pos
        c, e = _next(chain_it), _next(event_it)
    if e is not None:
        raise TamperError(count + 1, "stored event without a chain entry (inserted)")
    if expect_count is not None and count != expect_count:
        if count < expect_count:
            raise TamperError(count + 1, f"log ends at {count}, expected {expect_count} records")
        raise TamperError(expect_count + 1, f"log has {count} records, expected {expect_count}")
    if expect_head is not None and prev != expect_head:
        # The head names no position: the log was truncated after, or rewritten at or
        # before, its last record. Pair with expect_count to tell the two apart.
        raise TamperError(
            max(count, 1),
            f"head hash differs from the expected head (log ends at {count}: "
            "truncated after it or rewritten at or before it)",
        )
    return VerifyResult(count=count, head=prev)


def _check_columns(pos: int, e: Any, state: bytes) -> None:
    try:
        data = orjson.loads(state)
        same = (
            str(data["originator_id"]).replace("-", "") == str(e["originator_id"]).replace("-", "")
            and int(data["originator_version"]) == int(e["originator_version"])
            and data["topic"] == e["topic"]
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        same = False
    if not same:
        raise TamperError(pos, "event columns disagree with the record bytes")
