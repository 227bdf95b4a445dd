"""Streaming envelope files: round trip, every tampering fails alike, constant memory.

A real KeyLedger on a temporary SQLite file with the in-memory ``FakeKeyStore``: one
per module, because hypothesis reruns test bodies and must not use function fixtures.
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ledger.envelope_file as envelope_file
from ledger.bootstrap import open_ledger
from ledger.envelope_file import MAGIC, decrypt_file, encrypt_file
from ledger.errors import IncorrectKeyError, InvalidCiphertextError, ValidationError
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings
from tests.fakes import FakeKeyStore

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
TAG = 16
KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def ledger() -> Iterator[KeyLedger]:
    with tempfile.TemporaryDirectory(prefix="keyledger-envelope-") as tmp:
        app = open_ledger(Settings(data_dir=Path(tmp) / "data"), keystore=FakeKeyStore())
        yield app
        app.close()


@pytest.fixture(scope="module")
def key(ledger: KeyLedger) -> str:
    return str(ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"])


def seal(
    ledger: KeyLedger,
    key: str,
    data: bytes,
    *,
    context: Mapping[str, str] | None = None,
    chunk_size: int = 64,
) -> bytes:
    out = io.BytesIO()
    encrypt_file(
        ledger,
        caller=CALLER,
        key_id=key,
        src=io.BytesIO(data),
        dst=out,
        encryption_context=context,
        chunk_size=chunk_size,
    )
    return out.getvalue()


def unseal(ledger: KeyLedger, blob: bytes, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    decrypt_file(ledger, caller=CALLER, src=io.BytesIO(blob), dst=out, **kwargs)
    return out.getvalue()


def header_len(blob: bytes) -> int:
    return 8 + struct.unpack(">I", blob[4:8])[0]


def chunks_of(blob: bytes, chunk_size: int) -> tuple[bytes, list[bytes]]:
    """The header and the stored chunks (each with its tag)."""
    h = header_len(blob)
    body = blob[h:]
    full = chunk_size + TAG
    return blob[:h], [body[i : i + full] for i in range(0, len(body), full)]


def fails(ledger: KeyLedger, blob: bytes, **kwargs: Any) -> None:
    with pytest.raises(InvalidCiphertextError) as info:
        unseal(ledger, blob, **kwargs)
    assert str(info.value) == ""  # no detail, and never a byte of the data


def pseudo_random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# ---------------------------------------------------------------- format, round trip


def test_file_is_magic_length_canonical_header_then_chunks_of_chunk_size_plus_tag(
    ledger: KeyLedger, key: str
) -> None:
    blob = seal(ledger, key, b"x" * 150, context={"purpose": "test"}, chunk_size=64)
    assert blob[:4] == MAGIC
    header, chunks = chunks_of(blob, 64)
    fields = orjson.loads(header[8:])
    assert set(fields) == {
        "chunkSize",
        "encryptedDataKey",
        "encryptionContext",
        "keyId",
        "noncePrefix",
        "version",
    }
    assert fields["version"] == 1 and fields["chunkSize"] == 64
    assert fields["keyId"].endswith(key)
    assert fields["encryptionContext"] == {"purpose": "test"}
    assert len(base64.b64decode(fields["noncePrefix"])) == 7
    assert [len(c) for c in chunks] == [80, 80, 22 + TAG]


def test_empty_input_and_exact_multiples_end_with_a_short_final_chunk(
    ledger: KeyLedger, key: str
) -> None:
    empty = seal(ledger, key, b"")
    assert [len(c) for c in chunks_of(empty, 64)[1]] == [TAG]
    assert unseal(ledger, empty) == b""
    exact = seal(ledger, key, b"y" * 128)
    assert [len(c) for c in chunks_of(exact, 64)[1]] == [80, 80, TAG]
    assert unseal(ledger, exact) == b"y" * 128


def test_stats_count_bytes_in_and_out_and_chunks(ledger: KeyLedger, key: str) -> None:
    src, out = io.BytesIO(b"z" * 1000), io.BytesIO()
    stats = encrypt_file(ledger, caller=CALLER, key_id=key, src=src, dst=out, chunk_size=256)
    assert stats["BytesIn"] == 1000 and stats["BytesOut"] == len(out.getvalue())
    assert stats["Chunks"] == 4 and stats["KeyId"].endswith(key)
    back = io.BytesIO()
    dstats = decrypt_file(ledger, caller=CALLER, src=io.BytesIO(out.getvalue()), dst=back)
    assert dstats["BytesIn"] == len(out.getvalue()) and dstats["BytesOut"] == 1000
    assert dstats["Chunks"] == 4 and dstats["KeyId"] == stats["KeyId"]


contexts = (
    st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=12), max_size=4) | st.none()
)


@settings(max_examples=100, deadline=None)
@given(
    size=st.one_of(st.integers(0, 4 * 4 * KiB), st.integers(0, 3 * MiB)),
    chunk_size=st.integers(1 * KiB, 4 * KiB),
    seed=st.integers(0, 2**32),
    context=contexts,
)
@example(size=3 * MiB, chunk_size=64 * KiB, seed=1, context=None)
@example(size=2 * MiB + 1, chunk_size=1 * MiB, seed=2, context={"a": "b"})
@example(size=2 * MiB, chunk_size=1 * MiB, seed=3, context=None)
def test_any_input_round_trips_with_any_context_and_chunk_size(
    ledger: KeyLedger,
    key: str,
    size: int,
    chunk_size: int,
    seed: int,
    context: dict[str, str] | None,
) -> None:
    data = pseudo_random(size, seed)
    blob = seal(ledger, key, data, context=context, chunk_size=chunk_size)
    assert unseal(ledger, blob) == data
    assert unseal(ledger, blob, encryption_context=context or {}) == data


def test_input_that_reads_short_is_still_chunked_exactly(ledger: KeyLedger, key: str) -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = memoryview(data)

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            piece, self.data = bytes(self.data[: min(n, 7)]), self.data[min(n, 7) :]
            return piece

    data = pseudo_random(1000, 7)
    out = io.BytesIO()
    encrypt_file(ledger, caller=CALLER, key_id=key, src=Trickle(data), dst=out, chunk_size=100)  # type: ignore[arg-type]
    assert [len(c) for c in chunks_of(out.getvalue(), 100)[1]] == [116] * 10 + [TAG]
    assert unseal(ledger, out.getvalue()) == data


# ---------------------------------------------------------------- tampering

# One small file of four chunks shared by the tampering tests (64-byte chunks).
SMALL = pseudo_random(64 * 3 + 30, 42)


@pytest.fixture(scope="module")
def sealed(ledger: KeyLedger, key: str) -> bytes:
    return seal(ledger, key, SMALL, context={"tenant": "acme"}, chunk_size=64)


@settings(max_examples=300, deadline=None)
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
@example(where=0.0, mask=1)  # the magic
@example(where=5 / 500, mask=1)  # the header length
@example(where=0.9999, mask=0x80)  # the last tag byte
def test_any_single_byte_change_fails(
    ledger: KeyLedger, sealed: bytes, where: float, mask: int
) -> None:
    i = int(where * len(sealed))
    tampered = bytearray(sealed)
    tampered[i] ^= mask
    fails(ledger, bytes(tampered))


def test_every_single_byte_change_in_the_header_fails(ledger: KeyLedger, sealed: bytes) -> None:
    for i in range(header_len(sealed)):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        fails(ledger, bytes(tampered))


def test_swapped_repeated_or_dropped_chunks_fail(ledger: KeyLedger, sealed: bytes) -> None:
    header, chunks = chunks_of(sealed, 64)
    assert len(chunks) == 4
    a, b, c, final = chunks
    for order in (
        [b, a, c, final],
        [a, c, b, final],
        [a, a, c, final],
        [a, b, final],
        [b, c, final],
    ):
        fails(ledger, header + b"".join(order))


def test_dropping_the_final_chunk_fails(ledger: KeyLedger, sealed: bytes) -> None:
    header, chunks = chunks_of(sealed, 64)
    fails(ledger, header + b"".join(chunks[:-1]))


def test_truncation_anywhere_fails(ledger: KeyLedger, sealed: bytes) -> None:
    h = header_len(sealed)
    boundaries = [0, 4, 8, h, *range(h + 80, len(sealed), 80)]
    for cut in [*boundaries, *range(len(sealed) - TAG - 1, len(sealed))]:
        fails(ledger, sealed[:cut])


@pytest.mark.parametrize("extra", [b"\x00", b"more data", b"\x00" * 80])
def test_bytes_after_the_final_chunk_fail(ledger: KeyLedger, sealed: bytes, extra: bytes) -> None:
    fails(ledger, sealed + extra)


def test_a_chunk_from_another_file_fails(ledger: KeyLedger, key: str, sealed: bytes) -> None:
    other = seal(ledger, key, SMALL, context={"tenant": "acme"}, chunk_size=64)
    header, chunks = chunks_of(sealed, 64)
    _, other_chunks = chunks_of(other, 64)
    fails(ledger, header + chunks[0] + other_chunks[1] + b"".join(chunks[2:]))
    fails(ledger, other[: header_len(other)] + b"".join(chunks))


def test_a_malformed_header_fails_before_any_decrypt(ledger: KeyLedger, sealed: bytes) -> None:
    def with_fields(**changes: Any) -> bytes:
        fields = {**orjson.loads(sealed[8 : header_len(sealed)]), **changes}
        body = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
        return MAGIC + struct.pack(">I", len(body)) + body + sealed[header_len(sealed) :]

    fails(ledger, b"")
    fails(ledger, b"KLX2" + sealed[4:])
    fails(ledger, MAGIC + struct.pack(">I", 2**31) + sealed[8:])
    fails(ledger, with_fields(version=2))
    fails(ledger, with_fields(chunkSize=0))
    fails(ledger, with_fields(chunkSize=2**40))
    fails(ledger, with_fields(noncePrefix="AAAA"))
    fails(ledger, with_fields(encryptedDataKey="not base64!"))
    fails(ledger, with_fields(encryptionContext={"": "x"}))
    fails(ledger, with_fields(extra=1))
    body = b'{"version": 1}'  # not canonical
    fails(ledger, MAGIC + struct.pack(">I", len(body)) + body)


def test_decrypt_fails_when_encryption_context_differs(ledger: KeyLedger, sealed: bytes) -> None:
    assert unseal(ledger, sealed, encryption_context={"tenant": "acme"}) == SMALL
    before = ledger.db.head_seq()
    for wrong in ({"tenant": "evil"}, {}, {"tenant": "acme", "x": "y"}):
        fails(ledger, sealed, encryption_context=wrong)
    failures = [r.event() for r in ledger.db.read_records(before, 100)]
    assert [e["call"]["operation"] for e in failures] == ["Decrypt"] * 3
    assert {e["error_code"] for e in failures} == {"InvalidCiphertextException"}


def test_a_header_context_changed_to_match_a_wrong_one_still_fails(
    ledger: KeyLedger, sealed: bytes
) -> None:
    h = header_len(sealed)
    changed = sealed[:h].replace(b'"acme"', b'"evil"')
    fails(ledger, changed + sealed[h:], encryption_context={"tenant": "evil"})


def test_naming_another_key_raises_incorrect_key(ledger: KeyLedger, sealed: bytes) -> None:
    other = str(ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"])
    with pytest.raises(IncorrectKeyError):
        unseal(ledger, sealed, key_id=other)


def test_only_authenticated_chunks_reach_the_output(ledger: KeyLedger, sealed: bytes) -> None:
    tampered = bytearray(sealed)
    tampered[header_len(sealed) + 2 * 80 + 3] ^= 0x01  # in the third chunk
    out = io.BytesIO()
    with pytest.raises(InvalidCiphertextError):
        decrypt_file(ledger, caller=CALLER, src=io.BytesIO(bytes(tampered)), dst=out)
    assert out.getvalue() == SMALL[:128]  # the two verified chunks, nothing after


def test_aad_is_the_sha256_of_the_stored_header(ledger: KeyLedger, key: str) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    captured: list[bytearray] = []

    def spy(k: bytearray) -> AESGCM:
        captured.append(k)
        return AESGCM(k)

    data = b"hello envelope"
    mp = pytest.MonkeyPatch()
    mp.setattr(envelope_file, "AESGCM", spy)
    try:
        out = io.BytesIO()
        resp_key: list[bytes] = []
        real = ledger.generate_data_key

        def gdk(**kwargs: Any) -> dict[str, Any]:
            resp = real(**kwargs)
            resp_key.append(bytes(resp["Plaintext"]))
            return resp

        mp.setattr(ledger, "generate_data_key", gdk)
        encrypt_file(ledger, caller=CALLER, key_id=key, src=io.BytesIO(data), dst=out)
    finally:
        mp.undo()
    blob = out.getvalue()
    h = header_len(blob)
    fields = orjson.loads(blob[8:h])
    nonce = base64.b64decode(fields["noncePrefix"]) + struct.pack(">IB", 0, 1)
    aead = AESGCM(resp_key[0])
    assert aead.decrypt(nonce, blob[h:], hashlib.sha256(blob[:h]).digest()) == data
    assert captured and captured[0] == bytearray(32)  # the data key buffer was wiped


def test_chunk_size_out_of_range_is_a_validation_error(ledger: KeyLedger, key: str) -> None:
    for bad in (0, -1, 16 * MiB + 1):
        with pytest.raises(ValidationError):
            seal(ledger, key, b"x", chunk_size=bad)


# ---------------------------------------------------------------- constant memory


class PatternReader(io.RawIOBase):
    """``size`` bytes made on demand (never held whole)."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = bytes(range(256)) * 256

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = min(n, self.left, len(self.block))
        self.left -= n
        return self.block[:n]


class NullWriter(io.RawIOBase):
    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.count += len(b)
        return len(b)


def test_encrypting_and_decrypting_64_mib_uses_constant_memory(
    ledger: KeyLedger, key: str, tmp_path: Path
) -> None:
    size = 64 * MiB
    ledger.generate_data_key(caller=CALLER, key_id=key, key_spec="AES_256")  # warm caches
    sink = NullWriter()
    tracemalloc.start()
    try:
        encrypt_file(ledger, caller=CALLER, key_id=key, src=PatternReader(size), dst=sink)  # type: ignore[arg-type]
        encrypt_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sink.count > size
    assert encrypt_peak < 4 * MiB, encrypt_peak

    path = tmp_path / "big.klx"
    with path.open("wb") as f:
        encrypt_file(ledger, caller=CALLER, key_id=key, src=PatternReader(size), dst=f)  # type: ignore[arg-type]
    sink = NullWriter()
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            decrypt_file(ledger, caller=CALLER, src=f, dst=sink)  # type: ignore[arg-type]
        decrypt_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sink.count == size
    assert decrypt_peak < 4 * MiB, decrypt_peak
