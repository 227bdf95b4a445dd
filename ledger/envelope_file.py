"""Streaming envelope encryption of files of any size, in constant memory.

AWS's envelope model: one GenerateDataKey call gives an AES-256 data key in plaintext
and encrypted under a KMS key; the host encrypts the bulk data with the plaintext data
key (``cryptography``'s AES-GCM) and stores only the encrypted data key. Decryption
calls Decrypt on the encrypted data key, then decrypts the data on the host.

Format (version 1)::

    b"KLX1" | header length (uint32 BE) | header (canonical JSON) | chunk 0 | ... | chunk n

The header is the RFC 8785 canonical JSON object::

    {"chunkSize": int, "encryptedDataKey": base64, "encryptionContext": {str: str},
     "keyId": key ARN, "noncePrefix": base64 of 7 random bytes, "version": 1}

Each chunk is AES-256-GCM of ``chunkSize`` plaintext bytes (the last chunk: 0 to
``chunkSize - 1`` bytes, so a 0-byte file still has one, empty, final chunk) with a
16-byte tag. The nonce is ``noncePrefix (7) || chunk index (uint32 BE) || final flag``
(1 for the last chunk, else 0), the STREAM construction of Hoang, Reyhanitabar, Rogaway
and Vizár, and the AAD is the SHA-256 of the whole header as stored (magic, length and
JSON). So a changed byte anywhere, a reordered, repeated or dropped chunk, a truncation
(no final chunk) and data after the final chunk all fail authentication.

Every failure to decrypt raises one ``InvalidCiphertextError("")``, with no detail,
as Decrypt does. Neither keys, plaintext nor ciphertext bytes reach a log or an error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypedDict

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger.errors import InvalidCiphertextError, KeyLedgerError, ValidationError
from ledger.records import canonical

if TYPE_CHECKING:
    from ledger.service import Caller

MAGIC = b"KLX1"
FORMAT_VERSION = 1
NONCE_PREFIX_LEN = 7
TAG_LEN = 16
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024  # bounds what a (hostile) header can make us buffer
MAX_HEADER_LEN = 64 * 1024
MAX_CHUNKS = 2**32  # the chunk index is a uint32
_HEADER_FIELDS = frozenset(
    {"chunkSize", "encryptedDataKey", "encryptionContext", "keyId", "noncePrefix", "version"}
)
_DECRYPT_ALGORITHM = "SYMMETRIC_DEFAULT"


class DataKeyService(Protocol):
    """The part of ``KeyLedger`` envelope encryption needs."""

    def generate_data_key(
        self,
        *,
        caller: Caller,
        key_id: str,
        key_spec: str | None = None,
        number_of_bytes: int | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> dict[str, Any]: ...

    def decrypt(
        self,
        *,
        caller: Caller,
        ciphertext_blob: bytes,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
        encryption_algorithm: str | None = None,
    ) -> dict[str, Any]: ...

    def record_rejected(
        self, *, operation: str, caller: Caller, request: dict[str, Any], error: KeyLedgerError
    ) -> None: ...


class EnvelopeStats(TypedDict):
    """What one encryption or decryption did. ``BytesIn``/``BytesOut`` count what was
    read from ``src`` and written to ``dst``; ``Chunks`` includes the final chunk."""

    KeyId: str
    BytesIn: int
    BytesOut: int
    Chunks: int
    ChunkSize: int


def encrypt_file(
    ledger: DataKeyService,
    *,
    caller: Caller,
    key_id: str,
    src: BinaryIO,
    dst: BinaryIO,
    encryption_context: Mapping[str, str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> EnvelopeStats:
    """Encrypt everything ``src`` yields into ``dst`` under a fresh AES-256 data key.

    Makes one GenerateDataKey call (recorded in the ledger) under ``key_id`` with
    ``encryption_context``, which is stored in the header and must be given again (or
    left out) to decrypt. Memory use is a few chunks, whatever the input size.

    Security: the plaintext data key is held in a ``bytearray`` that is overwritten
    with zeros when done, as far as Python allows: the service's response, Python's
    ``bytes`` objects and ``cryptography``'s cipher context may keep copies until they
    are freed. Raises ValidationError (bad ``chunk_size`` or input over 2^32 chunks) and
    whatever GenerateDataKey raises (NotFoundError, DisabledError, ...).
    """
    if not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValidationError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}.")
    context = dict(encryption_context) if encryption_context is not None else {}
    resp = ledger.generate_data_key(
        caller=caller,
        key_id=key_id,
        key_spec="AES_256",
        encryption_context=None if encryption_context is None else context,
    )
    data_key = bytearray(resp.pop("Plaintext"))
    try:
        nonce_prefix = os.urandom(NONCE_PREFIX_LEN)
        header = _header_bytes(
            {
                "version": FORMAT_VERSION,
                "keyId": resp["KeyId"],
                "encryptionContext": context,
                "encryptedDataKey": base64.b64encode(resp["CiphertextBlob"]).decode("ascii"),
                "chunkSize": chunk_size,
                "noncePrefix": base64.b64encode(nonce_prefix).decode("ascii"),
            }
        )
        aad = hashlib.sha256(header).digest()
        aead = AESGCM(data_key)
        dst.write(header)
        bytes_in, bytes_out, index = 0, len(header), 0
        block = _read_exact(src, chunk_size)
        while True:
            final = len(block) < chunk_size
            if index >= MAX_CHUNKS:
                raise ValidationError("The input is too large for one envelope file.")
            sealed = aead.encrypt(_nonce(nonce_prefix, index, final), block, aad)
            dst.write(sealed)
            bytes_in += len(block)
            bytes_out += len(sealed)
            index += 1
            if final:
                break
            block = _read_exact(src, chunk_size)
    finally:
        _wipe(data_key)
    return EnvelopeStats(
        KeyId=resp["KeyId"],
        BytesIn=bytes_in,
        BytesOut=bytes_out,
        Chunks=index,
        ChunkSize=chunk_size,
    )


def decrypt_file(
    ledger: DataKeyService,
    *,
    caller: Caller,
    src: BinaryIO,
    dst: BinaryIO,
    encryption_context: Mapping[str, str] | None = None,
    key_id: str | None = None,
) -> EnvelopeStats:
    """Decrypt an envelope file made by ``encrypt_file`` from ``src`` into ``dst``.

    Calls Decrypt (recorded in the ledger) on the header's encrypted data key with the
    header's encryption context; ``encryption_context``, when given, must equal it
    (a mismatch is recorded as a failed Decrypt and the data key is never decrypted).
    ``key_id``, when given, is passed to Decrypt, which raises IncorrectKeyError if it
    names another key.

    Each chunk is written to ``dst`` only after its tag verifies, so no unauthenticated
    plaintext is released; but on failure ``dst`` may hold a verified *prefix* of the
    plaintext: a caller writing to a file must delete it (the CLI does). Raises
    InvalidCiphertextError("") for a malformed header, a tampered, reordered, truncated
    or extended file, or a wrong context or key, plus what Decrypt raises.

    Security: the data key is wiped as in ``encrypt_file`` (as far as Python allows).
    """
    header, fields = _read_header(src)
    header_context: dict[str, str] = fields["encryptionContext"]
    if encryption_context is not None and dict(encryption_context) != header_context:
        request: dict[str, Any] = {
            "encryptionAlgorithm": _DECRYPT_ALGORITHM,
            "encryptionContext": dict(encryption_context),
        }
        if key_id is not None:
            request["keyId"] = key_id
        error = InvalidCiphertextError("")
        ledger.record_rejected(operation="Decrypt", caller=caller, request=request, error=error)
        raise error
    try:
        encrypted_key = base64.b64decode(fields["encryptedDataKey"], validate=True)
        nonce_prefix = base64.b64decode(fields["noncePrefix"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCiphertextError("") from None
    if len(nonce_prefix) != NONCE_PREFIX_LEN or not encrypted_key:
        raise InvalidCiphertextError("")
    chunk_size: int = fields["chunkSize"]
    resp = ledger.decrypt(
        caller=caller,
        ciphertext_blob=encrypted_key,
        key_id=key_id,
        encryption_context=header_context or None,
    )
    data_key = bytearray(resp.pop("Plaintext"))
    try:
        if len(data_key) != 32:
            raise InvalidCiphertextError("")
        aead = AESGCM(data_key)
        aad = hashlib.sha256(header).digest()
        full = chunk_size + TAG_LEN
        bytes_in, bytes_out, index = len(header), 0, 0
        while True:
            block = _read_exact(src, full)
            final = len(block) < full
            if index >= MAX_CHUNKS or (final and src.read(1)):
                raise InvalidCiphertextError("")
            try:
                plain = aead.decrypt(_nonce(nonce_prefix, index, final), block, aad)
            except InvalidTag:
                raise InvalidCiphertextError("") from None
            dst.write(plain)  # only authenticated plaintext is released
            bytes_in += len(block)
            bytes_out += len(plain)
            index += 1
            if final:
                break
    finally:
        _wipe(data_key)
    return EnvelopeStats(
        KeyId=resp["KeyId"],
        BytesIn=bytes_in,
        BytesOut=bytes_out,
        Chunks=index,
        ChunkSize=chunk_size,
    )


def _header_bytes(fields: dict[str, Any]) -> bytes:
    body = canonical(fields)
    return MAGIC + struct.pack(">I", len(body)) + body


def _read_header(src: BinaryIO) -> tuple[bytes, dict[str, Any]]:
    """The header bytes as stored and its checked fields; InvalidCiphertextError if
    anything is off (the fields are authenticated later, through the chunks' AAD)."""
    prefix = _read_exact(src, len(MAGIC) + 4)
    if len(prefix) != len(MAGIC) + 4 or prefix[: len(MAGIC)] != MAGIC:
        raise InvalidCiphertextError("")
    (length,) = struct.unpack(">I", prefix[len(MAGIC) :])
    if length > MAX_HEADER_LEN:
        raise InvalidCiphertextError("")
    body = _read_exact(src, length)
    if len(body) != length:
        raise InvalidCiphertextError("")
    try:
        fields = orjson.loads(body)
        if not isinstance(fields, dict) or canonical(fields) != body:
            raise InvalidCiphertextError("")
    except (orjson.JSONDecodeError, TypeError):
        raise InvalidCiphertextError("") from None
    context = fields.get("encryptionContext")
    chunk_size = fields.get("chunkSize")
    if (
        set(fields) != _HEADER_FIELDS
        or fields["version"] != FORMAT_VERSION
        or type(chunk_size) is not int
        or not 1 <= chunk_size <= MAX_CHUNK_SIZE
        or not isinstance(fields["keyId"], str)
        or not isinstance(fields["encryptedDataKey"], str)
        or not isinstance(fields["noncePrefix"], str)
        or not isinstance(context, dict)
        or not all(k and isinstance(v, str) for k, v in context.items())
    ):
        raise InvalidCiphertextError("")
    return prefix + body, fields


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if final else 0)


def _read_exact(src: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at end of input (``read`` may return short)."""
    data = src.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAGIC",
    "DataKeyService",
    "EnvelopeStats",
    "decrypt_file",
    "encrypt_file",
]
