"""The ledger's Ed25519 signing key (checkpoints, C2SP signed notes), held on the
SoftHSM2 token: generation, lookup from another store, signing, destruction, labels,
threads."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pkcs11.exceptions
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pkcs11 import Attribute, KeyType, ObjectClass

from ledger.errors import HsmError
from ledger.keystore.pkcs11_adapter import (
    LEDGER_SIGNING_LABEL_PREFIX,
    Pkcs11KeyStore,
    ed25519_public_key,
    open_keystore,
)
from ledger.keystore.port import KeyStore
from ledger.settings import Settings

pytestmark = pytest.mark.softhsm

ED25519_OID = bytes.fromhex("06032b6570")  # DER of OID 1.3.101.112
ED25519_NAME = b"\x13\x0cedwards25519"  # DER PrintableString "edwards25519"


def _label() -> str:
    return f"{LEDGER_SIGNING_LABEL_PREFIX}{uuid.uuid4()}"


def _verifies(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _objects(store: Pkcs11KeyStore, label: str, object_class: ObjectClass) -> list[Any]:
    """Token objects of ``object_class`` with ``label``, through a fresh session."""
    session = store._login.token.open()
    try:
        return list(session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: label}))
    finally:
        session.close()


@pytest.fixture
def label(softhsm_keystore: Pkcs11KeyStore) -> Iterator[str]:
    """A fresh label, its key destroyed after the test."""
    name = _label()
    yield name
    softhsm_keystore.destroy_ledger_signing_key(name)


@pytest.fixture
def second_store(softhsm_settings: Settings) -> Iterator[Pkcs11KeyStore]:
    """Another store on the same token, with its own (empty) caches."""
    store = open_keystore(softhsm_settings)
    yield store
    store.close()


def test_pkcs11_keystore_still_satisfies_the_port(softhsm_keystore: Pkcs11KeyStore) -> None:
    ks: KeyStore = softhsm_keystore
    assert ks is softhsm_keystore


def test_signature_verifies_and_a_changed_message_does_not(
    softhsm_keystore: Pkcs11KeyStore, label: str
) -> None:
    public_key = softhsm_keystore.generate_ledger_signing_key(label)
    assert isinstance(public_key, bytes) and len(public_key) == 32
    message = b"keyledger.example/log\n42\nqUPgP0e7jKwIW2ZcHC2YX3Yp+OeyWT8F0Ed6JHcdKxE=\n"
    signature = softhsm_keystore.ledger_sign(label, message)
    assert isinstance(signature, bytes) and len(signature) == 64
    assert _verifies(public_key, signature, message)
    assert not _verifies(public_key, signature, message[:-1] + b"!")
    assert not _verifies(public_key, signature, b"")
    empty = softhsm_keystore.ledger_sign(label, b"")
    assert _verifies(public_key, empty, b"")
    big = bytes(range(256)) * 256  # 64 KiB
    assert _verifies(public_key, softhsm_keystore.ledger_sign(label, big), big)


def test_signatures_are_deterministic(softhsm_keystore: Pkcs11KeyStore, label: str) -> None:
    softhsm_keystore.generate_ledger_signing_key(label)
    first = softhsm_keystore.ledger_sign(label, b"same message")
    assert softhsm_keystore.ledger_sign(label, b"same message") == first
    assert softhsm_keystore.ledger_sign(label, bytearray(b"same message")) == first
    assert softhsm_keystore.ledger_sign(label, b"other message") != first


def test_private_key_is_a_sensitive_non_extractable_sign_only_token_object(
    softhsm_keystore: Pkcs11KeyStore, label: str
) -> None:
    public_key = softhsm_keystore.generate_ledger_signing_key(label)
    session = softhsm_keystore._login.token.open()
    try:
        (private,) = session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}
        )
        attrs = private.get_attributes(
            [
                Attribute.KEY_TYPE,
                Attribute.EC_PARAMS,
                Attribute.TOKEN,
                Attribute.PRIVATE,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.ALWAYS_SENSITIVE,
                Attribute.NEVER_EXTRACTABLE,
                Attribute.MODIFIABLE,
                Attribute.SIGN,
                Attribute.SIGN_RECOVER,
                Attribute.DECRYPT,
                Attribute.UNWRAP,
                Attribute.DERIVE,
            ]
        )
        # Generated with the OID 1.3.101.112; SoftHSM2 2.6 gives its private keys the
        # PrintableString "edwards25519" whatever the template said.
        assert attrs.pop(Attribute.EC_PARAMS) in (ED25519_OID, ED25519_NAME)
        assert attrs == {
            Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ALWAYS_SENSITIVE: True,
            Attribute.NEVER_EXTRACTABLE: True,
            Attribute.MODIFIABLE: False,
            Attribute.SIGN: True,
            Attribute.SIGN_RECOVER: False,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[Attribute.VALUE]

        (public,) = session.get_objects(
            {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label}
        )
        public_attrs = public.get_attributes(
            [
                Attribute.KEY_TYPE,
                Attribute.TOKEN,
                Attribute.VERIFY,
                Attribute.ENCRYPT,
                Attribute.WRAP,
                Attribute.ID,
                Attribute.EC_PARAMS,
                Attribute.EC_POINT,
            ]
        )
        assert public_attrs[Attribute.EC_PARAMS] == ED25519_OID
        assert public_attrs[Attribute.KEY_TYPE] == KeyType.EC_EDWARDS
        assert public_attrs[Attribute.TOKEN] is True
        assert public_attrs[Attribute.VERIFY] is True
        assert public_attrs[Attribute.ENCRYPT] is False
        assert public_attrs[Attribute.WRAP] is False
        # SoftHSM2 returns CKA_EC_POINT DER-wrapped: OCTET STRING of 32 bytes.
        assert public_attrs[Attribute.EC_POINT] == b"\x04\x20" + public_key
        # Both halves share a random CKA_ID.
        assert len(public_attrs[Attribute.ID]) == 16
        assert private[Attribute.ID] == public_attrs[Attribute.ID]
    finally:
        session.close()


def test_public_key_is_found_and_used_by_a_second_store(
    softhsm_keystore: Pkcs11KeyStore, second_store: Pkcs11KeyStore, label: str
) -> None:
    public_key = softhsm_keystore.generate_ledger_signing_key(label)
    assert softhsm_keystore.ledger_public_key(label) == public_key
    assert second_store.ledger_public_key(label) == public_key  # looked up on the token
    signature = second_store.ledger_sign(label, b"signed by the second store")
    assert _verifies(public_key, signature, b"signed by the second store")
    assert softhsm_keystore.ledger_sign(label, b"signed by the second store") == signature


def test_generating_the_same_label_twice_is_refused(
    softhsm_keystore: Pkcs11KeyStore, second_store: Pkcs11KeyStore, label: str
) -> None:
    public_key = softhsm_keystore.generate_ledger_signing_key(label)
    with pytest.raises(HsmError, match="already exists"):
        softhsm_keystore.generate_ledger_signing_key(label)
    with pytest.raises(HsmError, match="already exists"):
        second_store.generate_ledger_signing_key(label)  # nothing cached: found on the token
    assert len(_objects(softhsm_keystore, label, ObjectClass.PRIVATE_KEY)) == 1
    assert len(_objects(softhsm_keystore, label, ObjectClass.PUBLIC_KEY)) == 1
    assert softhsm_keystore.ledger_public_key(label) == public_key


def test_destroy_removes_both_objects_and_every_store_refuses_the_key(
    softhsm_keystore: Pkcs11KeyStore, second_store: Pkcs11KeyStore
) -> None:
    label = _label()
    old = softhsm_keystore.generate_ledger_signing_key(label)
    softhsm_keystore.ledger_sign(label, b"cache it")
    second_store.ledger_sign(label, b"cache it too")
    second_store.destroy_ledger_signing_key(label)
    assert _objects(softhsm_keystore, label, ObjectClass.PRIVATE_KEY) == []
    assert _objects(softhsm_keystore, label, ObjectClass.PUBLIC_KEY) == []
    for store in (softhsm_keystore, second_store):
        with pytest.raises(HsmError, match="not found"):
            store.ledger_sign(label, b"after destroy")
        with pytest.raises(HsmError, match="not found"):
            store.ledger_public_key(label)
    softhsm_keystore.destroy_ledger_signing_key(label)  # idempotent
    softhsm_keystore.destroy_ledger_signing_key(_label())  # never existed
    # The label can be used again: a new, different key.
    new = softhsm_keystore.generate_ledger_signing_key(label)
    try:
        assert new != old
        assert second_store.ledger_public_key(label) == new
    finally:
        softhsm_keystore.destroy_ledger_signing_key(label)


def test_absent_key_raises_hsm_error(softhsm_keystore: Pkcs11KeyStore) -> None:
    label = _label()
    with pytest.raises(HsmError, match="not found"):
        softhsm_keystore.ledger_public_key(label)
    with pytest.raises(HsmError, match="not found"):
        softhsm_keystore.ledger_sign(label, b"x")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        LEDGER_SIGNING_LABEL_PREFIX,
        "keyledger-domain-wrap",
        "keyledger-kek-1234",
        "ledger-signing-1",
        LEDGER_SIGNING_LABEL_PREFIX + "a\nb",
        LEDGER_SIGNING_LABEL_PREFIX + "é",
        LEDGER_SIGNING_LABEL_PREFIX + "x" * (65 - len(LEDGER_SIGNING_LABEL_PREFIX)),
    ],
)
def test_invalid_labels_are_refused_without_echo(
    softhsm_keystore: Pkcs11KeyStore, bad: str
) -> None:
    calls = [
        lambda: softhsm_keystore.generate_ledger_signing_key(bad),
        lambda: softhsm_keystore.ledger_public_key(bad),
        lambda: softhsm_keystore.ledger_sign(bad, b"x"),
        lambda: softhsm_keystore.destroy_ledger_signing_key(bad),
    ]
    for call in calls:
        with pytest.raises(HsmError, match="invalid ledger signing key label") as excinfo:
            call()
        if bad and bad != LEDGER_SIGNING_LABEL_PREFIX:
            assert bad not in str(excinfo.value)
    if bad:  # an empty label would match every unlabelled key other tests made
        assert _objects(softhsm_keystore, bad, ObjectClass.PRIVATE_KEY) == []


def test_a_64_character_label_is_accepted(softhsm_keystore: Pkcs11KeyStore) -> None:
    label = LEDGER_SIGNING_LABEL_PREFIX + uuid.uuid4().hex[: 64 - len(LEDGER_SIGNING_LABEL_PREFIX)]
    label = label.ljust(64, "0")
    assert len(label) == 64
    try:
        public_key = softhsm_keystore.generate_ledger_signing_key(label)
        assert _verifies(public_key, softhsm_keystore.ledger_sign(label, b"m"), b"m")
    finally:
        softhsm_keystore.destroy_ledger_signing_key(label)


def test_non_bytes_message_is_refused(softhsm_keystore: Pkcs11KeyStore, label: str) -> None:
    softhsm_keystore.generate_ledger_signing_key(label)
    with pytest.raises(HsmError, match="must be bytes"):
        softhsm_keystore.ledger_sign(label, "text")  # type: ignore[arg-type]


def test_closed_store_refuses(softhsm_settings: Settings, label: str) -> None:
    store = open_keystore(softhsm_settings)
    store.generate_ledger_signing_key(label)
    store.close()
    with pytest.raises(HsmError, match="closed"):
        store.ledger_sign(label, b"x")
    with pytest.raises(HsmError, match="closed"):
        store.ledger_public_key(label)


def test_four_threads_sign_200_times_each_and_every_signature_verifies(
    softhsm_keystore: Pkcs11KeyStore, second_store: Pkcs11KeyStore, label: str
) -> None:
    public_key = softhsm_keystore.generate_ledger_signing_key(label)
    verifier = Ed25519PublicKey.from_public_bytes(public_key)
    # Threads 1 and 3 use a store that has not cached the key yet: they race the lookup.
    stores = [softhsm_keystore, second_store]
    start = threading.Barrier(4)
    failures: list[BaseException] = []
    results: list[list[tuple[bytes, bytes]]] = [[] for _ in range(4)]

    def worker(index: int) -> None:
        store = stores[index % 2]
        try:
            start.wait()
            for i in range(200):
                message = f"checkpoint {index} {i}".encode()
                results[index].append((message, store.ledger_sign(label, message)))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures
    assert all(len(r) == 200 for r in results)
    for per_thread in results:
        for message, signature in per_thread:
            verifier.verify(signature, message)  # raises InvalidSignature on failure


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"\x04\x20" + bytes(range(32)), bytes(range(32))),
        (bytes(range(32)), bytes(range(32))),
        (b"\x04\x20" + b"\x04\x20" + bytes(30), b"\x04\x20" + bytes(30)),
    ],
)
def test_ec_point_is_unwrapped_or_taken_raw(value: bytes, expected: bytes) -> None:
    assert ed25519_public_key(value) == expected


@pytest.mark.parametrize("value", [b"", bytes(31), bytes(33), b"\x04\x21" + bytes(32), None])
def test_malformed_ec_point_is_refused(value: object) -> None:
    with pytest.raises(HsmError, match="invalid Ed25519 public key"):
        ed25519_public_key(value)
