"""The read side of the log as followers see it: chained records in ledger order.

A record's ``data`` is the stored event's canonical bytes (RFC 8785 JSON: sorted
keys, no floats), exactly as stored; ``record_hash`` is SHA-256 over those bytes and
``prev`` the previous record's hash (32 zero bytes before the first record).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

GENESIS = bytes(32)


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes (RFC 8785: keys sorted by UTF-16 code units, compact, UTF-8).

    Raises TypeError for floats or integers beyond ±2^53, which this domain excludes so
    that every JCS implementation gives identical bytes.
    """
    if _check_canonical_domain(obj):
        # A key outside the BMP: code point order differs from UTF-16 order.
        return orjson.dumps(_utf16_sorted(obj))
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _check_canonical_domain(obj: Any) -> bool:
    """Raise TypeError outside the domain; return True if a key is outside the BMP."""
    kind = type(obj)
    if kind is str or obj is None or kind is bool:  # the common leaves, by exact type
        return False
    if isinstance(obj, bool | str):
        return False
    if isinstance(obj, int):
        if abs(obj) > 2**53:
            raise TypeError("integer out of the canonical JSON range")
        return False
    if isinstance(obj, float):
        raise TypeError("floats are not allowed in canonical JSON")
    astral = False
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError("canonical JSON keys must be strings")
            if _check_canonical_domain(v) or (not k.isascii() and max(k) > "\uffff"):
                astral = True
        return astral
    if isinstance(obj, list | tuple):
        for v in obj:
            astral = _check_canonical_domain(v) or astral
        return astral
    raise TypeError(f"type {type(obj).__name__} is not allowed in canonical JSON")


def _utf16_sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _utf16_sorted(obj[k]) for k in sorted(obj, key=lambda s: s.encode("utf-16-be"))}
    if isinstance(obj, list | tuple):
        return [_utf16_sorted(v) for v in obj]
    return obj


def record_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class LedgerRecord:
    """One chained record. ``seq`` is 1-based and contiguous across the ledger."""

    seq: int
    data: bytes = field(repr=False)
    record_hash: bytes
    prev: bytes

    def event(self) -> dict[str, Any]:
        """The decoded stored event (a dict of plain JSON values)."""
        value: dict[str, Any] = orjson.loads(self.data)
        return value


class LedgerReader(Protocol):
    def read_records(self, after_seq: int, limit: int) -> Sequence[LedgerRecord]:
        """Records with ``seq > after_seq`` in ledger order, at most ``limit``."""
        ...

    def head_seq(self) -> int:
        """The last committed ``seq`` (0 for an empty ledger)."""
        ...


class PositionStore(Protocol):
    """Durable positions of log followers (projections, relays), by name."""

    def get_position(self, name: str) -> int:
        """The last processed ``seq`` for ``name`` (0 when none was saved)."""
        ...

    def set_position(self, name: str, position: int) -> None: ...
