"""The ciphertext blob: versioned, self-describing, context bound as AAD.

Layout (format 1)::

    0x01 | key id (16 bytes, UUID) | backing-key version (uint32 BE) | IV (12) | ct || tag (16)

The AAD is the 21-byte header followed by the canonical JSON of the encryption
context, so the key id, the version and the whole context are authenticated; the
context itself is never stored in the blob.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from uuid import UUID

from ledger.errors import InvalidCiphertextError
from ledger.records import canonical

FORMAT_V1 = 0x01
HEADER_LEN = 1 + 16 + 4
IV_LEN = 12
TAG_LEN = 16
MIN_BLOB_LEN = HEADER_LEN + IV_LEN + TAG_LEN


@dataclass(frozen=True)
class Envelope:
    """A parsed ciphertext blob. ``ciphertext`` includes the GCM tag."""

    key_id: UUID
    version: int
    iv: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)

    @property
    def header(self) -> bytes:
        return header(self.key_id, self.version)

    def to_bytes(self) -> bytes:
        return self.header + self.iv + self.ciphertext


def header(key_id: UUID, version: int) -> bytes:
    return struct.pack(">B16sI", FORMAT_V1, key_id.bytes, version)


def aad(key_id: UUID, version: int, context: Mapping[str, str]) -> bytes:
    """Additional authenticated data binding header and encryption context."""
    return header(key_id, version) + canonical(dict(context))


def parse(blob: bytes) -> Envelope:
    """Parse a blob; raises InvalidCiphertextError when it is malformed."""
    if len(blob) < MIN_BLOB_LEN or blob[0] != FORMAT_V1:
        raise InvalidCiphertextError("")
    _, key_bytes, version = struct.unpack(">B16sI", blob[:HEADER_LEN])
    if version < 1:
        raise InvalidCiphertextError("")
    iv = blob[HEADER_LEN : HEADER_LEN + IV_LEN]
    return Envelope(
        key_id=UUID(bytes=key_bytes), version=version, iv=iv, ciphertext=blob[HEADER_LEN + IV_LEN :]
    )
