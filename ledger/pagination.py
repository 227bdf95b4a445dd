"""AWS-style pagination: Limit, Marker, NextMarker, Truncated."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any, TypeVar

from ledger.errors import InvalidMarkerError, ValidationError

T = TypeVar("T")
_PREFIX = "kl1:"


def check_limit(limit: int | None, *, maximum: int = 1000) -> None:
    """Raise ValidationError for a Limit outside 1..maximum (AWS's constraint text)."""
    if limit is None:
        return
    if limit < 1:
        raise ValidationError(
            f"1 validation error detected: Value '{limit}' at 'limit' failed to satisfy "
            "constraint: Member must have value greater than or equal to 1"
        )
    if limit > maximum:
        raise ValidationError(
            f"1 validation error detected: Value '{limit}' at 'limit' failed to satisfy "
            f"constraint: Member must have value less than or equal to {maximum}"
        )


def encode_marker(offset: int) -> str:
    return base64.urlsafe_b64encode(f"{_PREFIX}{offset}".encode()).decode("ascii")


def decode_marker(marker: str) -> int:
    """The offset a marker names; raises InvalidMarkerError for anything else."""
    try:
        text = base64.urlsafe_b64decode(marker.encode("ascii")).decode("ascii")
        if not text.startswith(_PREFIX):
            raise ValueError(marker)
        offset = int(text[len(_PREFIX) :])
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidMarkerError("Invalid marker") from None
    if offset < 0:
        raise InvalidMarkerError("Invalid marker")
    return offset


def paginate(
    items: Sequence[T],
    *,
    limit: int | None,
    marker: str | None,
    default: int = 100,
    maximum: int = 1000,
) -> tuple[list[T], dict[str, Any]]:
    """One page of ``items`` and the ``Truncated``/``NextMarker`` fields for it.

    Raises ValidationError for a bad Limit and InvalidMarkerError for a bad Marker.
    """
    check_limit(limit, maximum=maximum)
    size = limit or default
    start = decode_marker(marker) if marker is not None else 0
    if start > len(items):
        raise InvalidMarkerError("Invalid marker")
    page = list(items[start : start + size])
    more = start + size < len(items)
    fields: dict[str, Any] = {"Truncated": more}
    if more:
        fields["NextMarker"] = encode_marker(start + size)
    return page, fields
