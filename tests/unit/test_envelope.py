"""The ciphertext envelope: layout, round trip, and that every tampering fails alike."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import envelope
from ledger.envelope import FORMAT_V1, HEADER_LEN, IV_LEN, MIN_BLOB_LEN, TAG_LEN, Envelope
from ledger.errors import InvalidCiphertextError
from ledger.keystore.port import MaterialRef
from tests.fakes import FakeKeyStore

# One store and one backing key for the whole module: hypothesis reruns the test body
# many times and must not depend on function-scoped fixtures.
STORE = FakeKeyStore()
MATERIAL = STORE.generate_symmetric_key()
KEY_ID = UUID("1234abcd-12ab-34cd-56ef-1234567890ab")

contexts = st.dictionaries(st.text(max_size=16), st.text(max_size=16), max_size=6)
plaintexts = st.binary(min_size=1, max_size=4096)
versions = st.integers(min_value=1, max_value=2**32 - 1)


def seal(
    plaintext: bytes,
    context: Mapping[str, str],
    *,
    key_id: UUID = KEY_ID,
    version: int = 1,
    material: MaterialRef = MATERIAL,
) -> bytes:
    """Encrypt as the service does: the AAD binds the header and the context."""
    iv, ct = STORE.encrypt(material, plaintext, envelope.aad(key_id, version, context))
    return Envelope(key_id=key_id, version=version, iv=iv, ciphertext=ct).to_bytes()


def open_blob(
    blob: bytes, context: Mapping[str, str], *, material: MaterialRef = MATERIAL
) -> bytes:
    """Decrypt as the service does: the AAD is rebuilt from the parsed header."""
    env = envelope.parse(blob)
    return STORE.decrypt(
        material, env.iv, env.ciphertext, envelope.aad(env.key_id, env.version, context)
    )


def test_blob_layout_is_format_byte_key_id_version_iv_then_ciphertext_and_tag() -> None:
    blob = seal(b"hello", {}, version=7)
    assert blob[0] == FORMAT_V1
    assert blob[1:17] == KEY_ID.bytes
    assert struct.unpack(">I", blob[17:21]) == (7,)
    assert len(blob) == HEADER_LEN + IV_LEN + len(b"hello") + TAG_LEN


@settings(max_examples=150, deadline=None)
@given(
    key_id=st.uuids(),
    version=versions,
    iv=st.binary(min_size=IV_LEN, max_size=IV_LEN),
    ciphertext=st.binary(min_size=TAG_LEN, max_size=256),
)
def test_parse_gives_back_the_envelope_that_to_bytes_wrote(
    key_id: UUID, version: int, iv: bytes, ciphertext: bytes
) -> None:
    env = Envelope(key_id=key_id, version=version, iv=iv, ciphertext=ciphertext)
    blob = env.to_bytes()
    assert envelope.parse(blob) == env
    assert envelope.parse(blob).to_bytes() == blob


def test_envelope_repr_shows_neither_iv_nor_ciphertext() -> None:
    env = Envelope(key_id=KEY_ID, version=1, iv=b"\xaa" * IV_LEN, ciphertext=b"\xbb" * TAG_LEN)
    text = repr(env)
    assert str(KEY_ID) in text
    assert "iv" not in text
    assert "ciphertext" not in text
    assert "\\xbb" not in text


@settings(max_examples=150, deadline=None)
@given(plaintext=plaintexts, context=contexts, version=versions)
def test_decrypt_returns_the_plaintext_for_any_plaintext_and_context(
    plaintext: bytes, context: dict[str, str], version: int
) -> None:
    blob = seal(plaintext, context, version=version)
    assert open_blob(blob, dict(reversed(list(context.items())))) == plaintext


@settings(max_examples=200, deadline=None)
@given(plaintext=plaintexts, context=contexts, data=st.data())
def test_decrypt_fails_when_any_single_byte_of_the_blob_changes(
    plaintext: bytes, context: dict[str, str], data: st.DataObject
) -> None:
    blob = seal(plaintext, context)
    index = data.draw(st.integers(0, len(blob) - 1), label="index")
    delta = data.draw(st.integers(1, 255), label="xor")
    tampered = blob[:index] + bytes([blob[index] ^ delta]) + blob[index + 1 :]
    with pytest.raises(InvalidCiphertextError):
        open_blob(tampered, context)


@settings(max_examples=100, deadline=None)
@given(plaintext=plaintexts, context=contexts, data=st.data())
def test_decrypt_fails_when_a_byte_is_removed_or_inserted(
    plaintext: bytes, context: dict[str, str], data: st.DataObject
) -> None:
    blob = seal(plaintext, context)
    index = data.draw(st.integers(0, len(blob)), label="index")
    if data.draw(st.booleans(), label="insert"):
        tampered = blob[:index] + data.draw(st.binary(min_size=1, max_size=1)) + blob[index:]
    else:
        index = min(index, len(blob) - 1)
        tampered = blob[:index] + blob[index + 1 :]
    with pytest.raises(InvalidCiphertextError):
        open_blob(tampered, context)


def _changed_context(context: dict[str, str], data: st.DataObject) -> dict[str, str]:
    """One edit of the context: add, remove, rename a key, or change a value."""
    edits = ["add"] + (["remove", "rename", "revalue"] if context else [])
    edit = data.draw(st.sampled_from(edits), label="edit")
    changed = dict(context)
    if edit == "add":
        key = data.draw(st.text(max_size=16).filter(lambda k: k not in context), label="new key")
        changed[key] = data.draw(st.text(max_size=16), label="new value")
        return changed
    key = data.draw(st.sampled_from(sorted(context)), label="key")
    if edit == "remove":
        del changed[key]
    elif edit == "rename":
        new_key = data.draw(st.text(max_size=16).filter(lambda k: k not in context), label="to")
        changed[new_key] = changed.pop(key)
    else:
        changed[key] = data.draw(st.text(max_size=16).filter(lambda v: v != context[key]))
    return changed


@settings(max_examples=200, deadline=None)
@given(plaintext=plaintexts, context=contexts, data=st.data())
def test_decrypt_fails_when_encryption_context_differs(
    plaintext: bytes, context: dict[str, str], data: st.DataObject
) -> None:
    blob = seal(plaintext, context)
    changed = _changed_context(context, data)
    assert changed != context
    with pytest.raises(InvalidCiphertextError):
        open_blob(blob, changed)


def test_decrypt_fails_under_a_different_backing_key() -> None:
    blob = seal(b"secret", {"purpose": "test"})
    other = STORE.generate_symmetric_key()
    with pytest.raises(InvalidCiphertextError):
        open_blob(blob, {"purpose": "test"}, material=other)


def test_decrypt_fails_when_the_blob_names_another_key_id_or_version() -> None:
    blob = seal(b"secret", {}, version=1)
    for key_id, version in ((uuid4(), 1), (KEY_ID, 2)):
        env = envelope.parse(blob)
        moved = Envelope(key_id=key_id, version=version, iv=env.iv, ciphertext=env.ciphertext)
        with pytest.raises(InvalidCiphertextError):
            open_blob(moved.to_bytes(), {})


def _assert_rejected_without_detail(blob: bytes) -> None:
    with pytest.raises(InvalidCiphertextError) as caught:
        envelope.parse(blob)
    assert str(caught.value) == ""
    assert caught.value.message == ""


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=MIN_BLOB_LEN - 1))
def test_parse_rejects_a_blob_shorter_than_header_iv_and_tag(blob: bytes) -> None:
    _assert_rejected_without_detail(blob)


@settings(max_examples=100, deadline=None)
@given(
    format_byte=st.integers(0, 255).filter(lambda b: b != FORMAT_V1),
    rest=st.binary(min_size=MIN_BLOB_LEN - 1, max_size=128),
)
def test_parse_rejects_an_unknown_format_byte(format_byte: int, rest: bytes) -> None:
    _assert_rejected_without_detail(bytes([format_byte]) + rest)


def test_parse_rejects_version_zero() -> None:
    blob = envelope.header(KEY_ID, 0) + bytes(IV_LEN + TAG_LEN)
    _assert_rejected_without_detail(blob)


def test_parse_accepts_the_shortest_well_formed_blob() -> None:
    blob = envelope.header(KEY_ID, 1) + bytes(IV_LEN + TAG_LEN)
    env = envelope.parse(blob)
    assert (env.key_id, env.version, len(env.iv), len(env.ciphertext)) == (KEY_ID, 1, 12, 16)


def test_aad_is_the_header_followed_by_the_canonical_context() -> None:
    aad = envelope.aad(KEY_ID, 3, {"b": "2", "a": "1"})
    assert aad == envelope.header(KEY_ID, 3) + b'{"a":"1","b":"2"}'
    assert envelope.aad(KEY_ID, 3, {}) == envelope.header(KEY_ID, 3) + b"{}"
