"""FakeKeyStore's ledger signing key (Ed25519 in memory): the same contract as the
PKCS#11 adapter's (tests/integration/test_ledger_signing_key.py)."""

from __future__ import annotations

import threading
import uuid

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.errors import HsmError
from ledger.keystore.port import KeyStore
from tests.fakes import FakeKeyStore

PREFIX = "keyledger-ledger-signing-"


def _label() -> str:
    return f"{PREFIX}{uuid.uuid4()}"


def _verifies(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        return False
    return True


@pytest.fixture
def store() -> FakeKeyStore:
    return FakeKeyStore()


def test_fake_keystore_still_satisfies_the_port() -> None:
    ks: KeyStore = FakeKeyStore()
    assert ks is not None


def test_signature_verifies_and_a_changed_message_does_not(store: FakeKeyStore) -> None:
    label = _label()
    public_key = store.generate_ledger_signing_key(label)
    assert isinstance(public_key, bytes) and len(public_key) == 32
    signature = store.ledger_sign(label, b"checkpoint")
    assert len(signature) == 64
    assert _verifies(public_key, signature, b"checkpoint")
    assert not _verifies(public_key, signature, b"checkpoinT")


def test_signatures_are_deterministic(store: FakeKeyStore) -> None:
    label = _label()
    store.generate_ledger_signing_key(label)
    first = store.ledger_sign(label, b"same")
    assert store.ledger_sign(label, b"same") == first
    assert store.ledger_sign(label, bytearray(b"same")) == first
    assert store.ledger_sign(label, b"other") != first


def test_public_key_equals_what_generate_returned(store: FakeKeyStore) -> None:
    label = _label()
    public_key = store.generate_ledger_signing_key(label)
    assert store.ledger_public_key(label) == public_key
    assert store.generate_ledger_signing_key(_label()) != public_key


def test_generating_the_same_label_twice_is_refused(store: FakeKeyStore) -> None:
    label = _label()
    public_key = store.generate_ledger_signing_key(label)
    with pytest.raises(HsmError, match="already exists"):
        store.generate_ledger_signing_key(label)
    assert store.ledger_public_key(label) == public_key  # the first key is kept


def test_destroy_then_sign_raises_and_destroy_is_idempotent(store: FakeKeyStore) -> None:
    label = _label()
    old = store.generate_ledger_signing_key(label)
    store.destroy_ledger_signing_key(label)
    with pytest.raises(HsmError, match="not found"):
        store.ledger_sign(label, b"x")
    with pytest.raises(HsmError, match="not found"):
        store.ledger_public_key(label)
    store.destroy_ledger_signing_key(label)
    store.destroy_ledger_signing_key(_label())
    assert store.generate_ledger_signing_key(label) != old


@pytest.mark.parametrize(
    "bad",
    [
        "",
        PREFIX,
        "keyledger-domain-wrap",
        "keyledger-kek-1234",
        PREFIX + "a\nb",
        PREFIX + "é",
        PREFIX + "x" * (65 - len(PREFIX)),
    ],
)
def test_invalid_labels_are_refused_without_echo(store: FakeKeyStore, bad: str) -> None:
    calls = [
        lambda: store.generate_ledger_signing_key(bad),
        lambda: store.ledger_public_key(bad),
        lambda: store.ledger_sign(bad, b"x"),
        lambda: store.destroy_ledger_signing_key(bad),
    ]
    for call in calls:
        with pytest.raises(HsmError, match="invalid ledger signing key label") as excinfo:
            call()
        if bad:
            assert bad not in str(excinfo.value)


def test_a_64_character_label_is_accepted(store: FakeKeyStore) -> None:
    label = (PREFIX + "x" * 64)[:64]
    public_key = store.generate_ledger_signing_key(label)
    assert _verifies(public_key, store.ledger_sign(label, b"m"), b"m")


def test_non_bytes_message_is_refused(store: FakeKeyStore) -> None:
    label = _label()
    store.generate_ledger_signing_key(label)
    with pytest.raises(HsmError, match="must be bytes"):
        store.ledger_sign(label, "text")  # type: ignore[arg-type]


def test_injected_failure_and_closed_store_raise(store: FakeKeyStore) -> None:
    label = _label()
    store.generate_ledger_signing_key(label)
    store.fail_next = True
    with pytest.raises(HsmError, match="injected"):
        store.ledger_sign(label, b"x")
    assert len(store.ledger_sign(label, b"x")) == 64
    store.close()
    with pytest.raises(HsmError, match="closed"):
        store.ledger_public_key(label)


def test_four_threads_sign_200_times_each_and_every_signature_verifies(
    store: FakeKeyStore,
) -> None:
    label = _label()
    verifier = Ed25519PublicKey.from_public_bytes(store.generate_ledger_signing_key(label))
    results: list[list[tuple[bytes, bytes]]] = [[] for _ in range(4)]
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
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
    for per_thread in results:
        assert len(per_thread) == 200
        for message, signature in per_thread:
            verifier.verify(signature, message)
