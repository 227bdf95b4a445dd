from __future__ import annotations

import hashlib

import pytest

from ledger.errors import HsmError, InvalidCiphertextError
from ledger.keystore.port import KeyStore, MaterialRef
from tests.fakes import FakeKeyStore


@pytest.fixture
def store() -> FakeKeyStore:
    return FakeKeyStore()


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_fake_keystore_satisfies_the_port() -> None:
    ks: KeyStore = FakeKeyStore()
    assert ks is not None


def test_round_trip_returns_the_plaintext(store: FakeKeyStore) -> None:
    m = store.generate_symmetric_key()
    iv, ct = store.encrypt(m, b"secret", b"ctx")
    assert len(iv) == 12
    assert len(ct) == len(b"secret") + 16
    assert store.decrypt(m, iv, ct, b"ctx") == b"secret"


def test_material_id_is_sha256_of_wrapped_and_blob_is_40_bytes(store: FakeKeyStore) -> None:
    m = store.generate_symmetric_key()
    assert m.material_id == hashlib.sha256(m.wrapped).hexdigest()
    assert len(m.wrapped) == 40
    assert m.wrapped.hex() not in repr(m)


@pytest.mark.parametrize("change", ["aad", "ciphertext", "tag", "iv", "material", "short"])
def test_decrypt_fails_with_one_error_whatever_changed(store: FakeKeyStore, change: str) -> None:
    m = store.generate_symmetric_key()
    iv, ct = store.encrypt(m, b"x" * 32, b"ctx")
    aad = b"ctx"
    if change == "aad":
        aad = b"ctY"
    elif change == "ciphertext":
        ct = _flip(ct, 0)
    elif change == "tag":
        ct = _flip(ct, len(ct) - 1)
    elif change == "iv":
        iv = _flip(iv, 0)
    elif change == "material":
        m = store.generate_symmetric_key()
    elif change == "short":
        ct = ct[:15]
    with pytest.raises(InvalidCiphertextError) as info:
        store.decrypt(m, iv, ct, aad)
    assert info.value.message == ""


def test_material_whose_id_does_not_match_is_refused(store: FakeKeyStore) -> None:
    m = store.generate_symmetric_key()
    forged = MaterialRef(material_id="00" * 32, wrapped=m.wrapped)
    with pytest.raises(HsmError):
        store.encrypt(forged, b"x", b"")


def test_injected_failure_raises_hsm_error_once(store: FakeKeyStore) -> None:
    store.fail_next = True
    with pytest.raises(HsmError):
        store.generate_symmetric_key()
    store.generate_symmetric_key()


def test_another_fake_cannot_decrypt(store: FakeKeyStore) -> None:
    m = store.generate_symmetric_key()
    with pytest.raises(HsmError):
        FakeKeyStore().encrypt(m, b"x", b"")


# ---------------------------------------------------------------- per-key KEKs


def test_material_under_a_kek_round_trips_and_names_its_kek(store: FakeKeyStore) -> None:
    m = store.generate_symmetric_key(kek="keyledger-kek-a")
    assert m.kek == "keyledger-kek-a"
    assert m.material_id == hashlib.sha256(m.wrapped).hexdigest()
    iv, ct = store.encrypt(m, b"secret", b"ctx")
    assert store.decrypt(m, iv, ct, b"ctx") == b"secret"
    assert store.generate_symmetric_key().kek is None
    assert store.keks == {"keyledger-kek-a"}


def test_material_claiming_another_kek_is_refused(store: FakeKeyStore) -> None:
    a = store.generate_symmetric_key(kek="keyledger-kek-a")
    store.generate_symmetric_key(kek="keyledger-kek-b")
    for claim in ("keyledger-kek-b", None):
        with pytest.raises(HsmError):
            store.encrypt(MaterialRef(a.material_id, a.wrapped, kek=claim), b"x", b"")
    store.encrypt(a, b"x", b"")  # now cached: the false claim is still refused
    with pytest.raises(HsmError):
        store.encrypt(MaterialRef(a.material_id, a.wrapped, kek="keyledger-kek-b"), b"x", b"")


def test_destroy_kek_shreds_its_material_only(store: FakeKeyStore) -> None:
    doomed = [store.generate_symmetric_key(kek="keyledger-kek-a") for _ in range(2)]
    other = store.generate_symmetric_key(kek="keyledger-kek-b")
    legacy = store.generate_symmetric_key()
    iv, ct = store.encrypt(doomed[0], b"p", b"")  # cached before destruction
    store.destroy_kek("keyledger-kek-a")
    store.destroy_kek("keyledger-kek-a")  # idempotent
    for m in doomed:
        with pytest.raises(HsmError, match="destroyed"):
            store.encrypt(m, b"x", b"")
    with pytest.raises(HsmError, match="destroyed"):
        store.decrypt(doomed[0], iv, ct, b"")
    for m in (other, legacy):
        iv2, ct2 = store.encrypt(m, b"ok", b"")
        assert store.decrypt(m, iv2, ct2, b"") == b"ok"
    assert store.keks == {"keyledger-kek-b"}


@pytest.mark.parametrize(
    "label",
    [
        "keyledger-domain-wrap",
        "keyledger-kek-",
        "kek-1",
        "keyledger-kek-\n",
        "keyledger-kek-é",
        "keyledger-kek-" + "x" * 115,
    ],
)
def test_invalid_kek_labels_are_refused(store: FakeKeyStore, label: str) -> None:
    with pytest.raises(HsmError):
        store.generate_symmetric_key(kek=label)
    with pytest.raises(HsmError):
        store.destroy_kek(label)
    store.generate_symmetric_key(kek="keyledger-kek-" + "x" * 114)  # 128: the limit
