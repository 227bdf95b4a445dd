from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pkcs11.exceptions
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

from ledger.errors import HsmError, InvalidCiphertextError
from ledger.keystore.pkcs11_adapter import DOMAIN_KEY_LABEL, Pkcs11KeyStore, open_keystore
from ledger.keystore.port import KeyStore, MaterialRef
from ledger.keystore.softhsm import ensure_embedded_token
from ledger.settings import DEFAULT_SOFTHSM_MODULE, Settings

pytestmark = pytest.mark.softhsm


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.fixture(scope="module")
def material(softhsm_keystore: Pkcs11KeyStore) -> MaterialRef:
    return softhsm_keystore.generate_symmetric_key()


def test_pkcs11_keystore_satisfies_the_port(softhsm_keystore: Pkcs11KeyStore) -> None:
    ks: KeyStore = softhsm_keystore
    assert ks is softhsm_keystore


@pytest.mark.parametrize("size", [0, 1, 4096])
def test_round_trip_returns_the_plaintext(
    softhsm_keystore: Pkcs11KeyStore, material: MaterialRef, size: int
) -> None:
    plaintext = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    iv, ct = softhsm_keystore.encrypt(material, plaintext, b"aad")
    assert len(iv) == 12
    assert len(ct) == size + 16
    assert softhsm_keystore.decrypt(material, iv, ct, b"aad") == plaintext


def test_each_encryption_uses_a_fresh_iv(
    softhsm_keystore: Pkcs11KeyStore, material: MaterialRef
) -> None:
    ivs = {softhsm_keystore.encrypt(material, b"x", b"")[0] for _ in range(50)}
    assert len(ivs) == 50


@pytest.mark.parametrize(
    "change", ["aad", "ciphertext", "tag", "iv", "material", "short_iv", "short_ciphertext"]
)
def test_decrypt_fails_with_one_error_whatever_changed(
    softhsm_keystore: Pkcs11KeyStore, material: MaterialRef, change: str
) -> None:
    iv, ct = softhsm_keystore.encrypt(material, b"p" * 64, b"context")
    aad, used = b"context", material
    if change == "aad":
        aad = b"contexT"
    elif change == "ciphertext":
        ct = _flip(ct, 3)
    elif change == "tag":
        ct = _flip(ct, len(ct) - 1)
    elif change == "iv":
        iv = _flip(iv, 0)
    elif change == "material":
        used = softhsm_keystore.generate_symmetric_key()
    elif change == "short_iv":
        iv = iv[:8]
    elif change == "short_ciphertext":
        ct = ct[:15]
    with pytest.raises(InvalidCiphertextError) as info:
        softhsm_keystore.decrypt(used, iv, ct, aad)
    assert info.value.message == ""
    assert info.value.__cause__ is None
    # The session that saw the failure is still usable.
    iv2, ct2 = softhsm_keystore.encrypt(material, b"again", b"")
    assert softhsm_keystore.decrypt(material, iv2, ct2, b"") == b"again"


def test_generated_material_is_a_40_byte_blob_named_by_its_sha256(
    softhsm_keystore: Pkcs11KeyStore,
) -> None:
    a = softhsm_keystore.generate_symmetric_key()
    b = softhsm_keystore.generate_symmetric_key()
    assert a.material_id == hashlib.sha256(a.wrapped).hexdigest()
    assert len(a.wrapped) == 40  # CKM_AES_KEY_WRAP_PAD of a 32-byte key
    assert a.wrapped != b.wrapped
    assert a.wrapped.hex() not in repr(a)


def test_material_whose_id_does_not_match_its_blob_is_refused(
    softhsm_keystore: Pkcs11KeyStore, material: MaterialRef
) -> None:
    forged = MaterialRef(material_id="ab" * 32, wrapped=material.wrapped)
    with pytest.raises(HsmError):
        softhsm_keystore.encrypt(forged, b"x", b"")


def test_garbage_blob_fails_as_hsm_error_without_data(softhsm_keystore: Pkcs11KeyStore) -> None:
    blob = bytes(40)
    bad = MaterialRef(material_id=hashlib.sha256(blob).hexdigest(), wrapped=blob)
    with pytest.raises(HsmError) as info:
        softhsm_keystore.encrypt(bad, b"x", b"")
    assert blob.hex() not in str(info.value)


def test_pin_file_is_0600_and_data_dir_0700(softhsm_settings: Settings) -> None:
    pin_file = softhsm_settings.data_dir / "hsm.pin"
    assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(softhsm_settings.data_dir.stat().st_mode) == 0o700


def test_second_ensure_reuses_the_token_and_pin(softhsm_settings: Settings) -> None:
    first = ensure_embedded_token(softhsm_settings.data_dir)
    second = ensure_embedded_token(softhsm_settings.data_dir)
    assert first == second
    assert first.pin == (softhsm_settings.data_dir / "hsm.pin").read_text().strip()
    assert first.pin not in repr(first)
    assert len(list((softhsm_settings.data_dir / "softhsm" / "tokens").iterdir())) == 1


def test_another_conf_in_the_same_process_is_refused(
    softhsm_keystore: Pkcs11KeyStore, tmp_path: Path
) -> None:
    with pytest.raises(HsmError, match="once per"):
        ensure_embedded_token(tmp_path / "other")


def test_a_new_store_on_the_same_token_decrypts_what_another_produced(
    softhsm_settings: Settings,
) -> None:
    first = open_keystore(softhsm_settings)
    m = first.generate_symmetric_key()
    iv, ct = first.encrypt(m, b"persisted", b"ctx")
    first.close()
    second = open_keystore(softhsm_settings)
    try:
        assert second.decrypt(m, iv, ct, b"ctx") == b"persisted"
    finally:
        second.close()


def test_closing_one_store_leaves_the_others_logged_in(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings, material: MaterialRef
) -> None:
    other = open_keystore(softhsm_settings)
    other.encrypt(material, b"x", b"")
    other.close()
    other.close()  # idempotent
    iv, ct = softhsm_keystore.encrypt(material, b"still here", b"")
    assert softhsm_keystore.decrypt(material, iv, ct, b"") == b"still here"
    with pytest.raises(HsmError):
        other.encrypt(material, b"x", b"")


def test_wrong_pin_is_refused(softhsm_keystore: Pkcs11KeyStore) -> None:
    with pytest.raises(HsmError, match="wrong PIN"):
        Pkcs11KeyStore(module=DEFAULT_SOFTHSM_MODULE, token_label="keyledger", pin="0000")


def test_unknown_token_label_is_refused(softhsm_keystore: Pkcs11KeyStore) -> None:
    with pytest.raises(HsmError, match="no PKCS#11 token"):
        Pkcs11KeyStore(module=DEFAULT_SOFTHSM_MODULE, token_label="nope", pin="0000")


def test_external_module_needs_a_pin(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, pkcs11_module=DEFAULT_SOFTHSM_MODULE)
    with pytest.raises(HsmError, match="KEYLEDGER_HSM_PIN"):
        open_keystore(settings)


def test_eight_threads_encrypt_and_decrypt_for_three_seconds_without_error(
    softhsm_keystore: Pkcs11KeyStore,
) -> None:
    keys = [softhsm_keystore.generate_symmetric_key() for _ in range(4)]
    deadline = time.monotonic() + 3.0
    errors: list[BaseException] = []
    counts = [0] * 8

    def work(n: int) -> None:
        try:
            i = 0
            while time.monotonic() < deadline:
                m = keys[(n + i) % len(keys)]
                pt = n.to_bytes(2, "big") * 512
                iv, ct = softhsm_keystore.encrypt(m, pt, b"t%d" % n)
                assert softhsm_keystore.decrypt(m, iv, ct, b"t%d" % n) == pt
                if i % 50 == 0:  # failures must not poison a pooled session
                    with pytest.raises(InvalidCiphertextError):
                        softhsm_keystore.decrypt(m, iv, _flip(ct, 0), b"t%d" % n)
                if i % 200 == 0:
                    softhsm_keystore.generate_symmetric_key()
                i += 1
            counts[n] = i
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(c > 10 for c in counts), counts


def test_a_forked_child_opens_its_own_store_and_refuses_the_inherited_one(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings, material: MaterialRef
) -> None:
    iv, ct = softhsm_keystore.encrypt(material, b"before fork", b"")
    pid = os.fork()
    if pid == 0:  # child: report through the exit code only
        code = 0
        try:
            try:
                softhsm_keystore.encrypt(material, b"x", b"")
                code = 1
            except HsmError:
                pass
            child_store = open_keystore(softhsm_settings)
            if child_store.decrypt(material, iv, ct, b"") != b"before fork":
                code = 2
            child_store.close()
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert softhsm_keystore.decrypt(material, iv, ct, b"") == b"before fork"


# ---------------------------------------------------------------- per-key KEKs


def _kek() -> str:
    return f"keyledger-kek-{uuid.uuid4()}"


def _objects_labelled(store: Pkcs11KeyStore, label: str) -> list[Any]:
    """Token objects with ``label``, seen through a fresh session (not the store's cache)."""
    session = store._login.token.open()
    try:
        return list(session.get_objects({Attribute.LABEL: label}))
    finally:
        session.close()


def _round_trips(store: Pkcs11KeyStore, m: MaterialRef) -> bool:
    iv, ct = store.encrypt(m, b"still usable", b"ctx")
    return store.decrypt(m, iv, ct, b"ctx") == b"still usable"


def test_material_under_a_kek_round_trips_and_names_its_kek(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings
) -> None:
    kek = _kek()
    a = softhsm_keystore.generate_symmetric_key(kek=kek)
    b = softhsm_keystore.generate_symmetric_key(kek=kek)
    assert a.kek == kek and b.kek == kek
    assert a.material_id == hashlib.sha256(a.wrapped).hexdigest()
    assert len(a.wrapped) == 40
    assert len(_objects_labelled(softhsm_keystore, kek)) == 1  # created once, then cached
    assert _round_trips(softhsm_keystore, a) and _round_trips(softhsm_keystore, b)
    iv, ct = softhsm_keystore.encrypt(a, b"across stores", b"")
    other = open_keystore(softhsm_settings)
    try:
        assert other.decrypt(a, iv, ct, b"") == b"across stores"
    finally:
        other.close()


def test_material_claiming_another_kek_does_not_unwrap(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings
) -> None:
    kek_a, kek_b = _kek(), _kek()
    a = softhsm_keystore.generate_symmetric_key(kek=kek_a)
    softhsm_keystore.generate_symmetric_key(kek=kek_b)
    fresh = open_keystore(softhsm_settings)  # nothing cached: the HSM itself refuses
    try:
        for claim in (kek_b, None):
            with pytest.raises(HsmError, match="cannot unwrap"):
                fresh.encrypt(MaterialRef(a.material_id, a.wrapped, kek=claim), b"x", b"")
        assert _round_trips(fresh, a)
        # Once unwrapped and cached, a false claim is still refused.
        with pytest.raises(HsmError, match="cannot unwrap"):
            fresh.encrypt(MaterialRef(a.material_id, a.wrapped, kek=kek_b), b"x", b"")
    finally:
        fresh.close()


def test_destroy_kek_shreds_its_material_in_every_store_and_only_its_material(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings
) -> None:
    doomed_kek, kept_kek = _kek(), _kek()
    used = softhsm_keystore.generate_symmetric_key(kek=doomed_kek)
    unused = softhsm_keystore.generate_symmetric_key(kek=doomed_kek)
    kept = softhsm_keystore.generate_symmetric_key(kek=kept_kek)
    legacy = softhsm_keystore.generate_symmetric_key()
    iv, ct = softhsm_keystore.encrypt(used, b"p", b"")  # cached unwrapped before
    bystander = open_keystore(softhsm_settings)  # another store in this process
    try:
        assert _round_trips(bystander, used)  # cached there too
        softhsm_keystore.destroy_kek(doomed_kek)
        softhsm_keystore.destroy_kek(doomed_kek)  # idempotent
        assert _objects_labelled(softhsm_keystore, doomed_kek) == []
        for store in (softhsm_keystore, bystander):
            for m in (used, unused):
                with pytest.raises(HsmError, match=r"^key material was destroyed$"):
                    store.encrypt(m, b"x", b"")
            with pytest.raises(HsmError, match=r"^key material was destroyed$"):
                store.decrypt(used, iv, ct, b"")
            assert _round_trips(store, kept) and _round_trips(store, legacy)
    finally:
        bystander.close()
    # A new store on the same token: the token object is gone, not just the cache.
    fresh = open_keystore(softhsm_settings)
    try:
        for m in (used, unused):
            with pytest.raises(HsmError, match=r"^key material was destroyed$"):
                fresh.encrypt(m, b"x", b"")
        assert _round_trips(fresh, kept) and _round_trips(fresh, legacy)
        # A later keygen under the label makes a new, different KEK: still no way back.
        fresh.generate_symmetric_key(kek=doomed_kek)
        with pytest.raises(HsmError, match="cannot unwrap"):
            fresh.encrypt(used, b"x", b"")
    finally:
        fresh.close()


def test_forget_drops_kek_material_from_the_cache_only(
    softhsm_keystore: Pkcs11KeyStore,
) -> None:
    m = softhsm_keystore.generate_symmetric_key(kek=_kek())
    iv, ct = softhsm_keystore.encrypt(m, b"x", b"")
    softhsm_keystore.forget(m.material_id)
    assert m.material_id not in softhsm_keystore._unwrapped
    assert softhsm_keystore.decrypt(m, iv, ct, b"") == b"x"  # unwraps again


def test_kek_is_a_sensitive_non_extractable_private_token_wrapping_key(
    softhsm_keystore: Pkcs11KeyStore,
) -> None:
    kek = _kek()
    softhsm_keystore.generate_symmetric_key(kek=kek)
    session = softhsm_keystore._login.token.open()
    try:
        (obj,) = session.get_objects({Attribute.LABEL: kek})
        attrs = obj.get_attributes(
            [
                Attribute.CLASS,
                Attribute.KEY_TYPE,
                Attribute.VALUE_LEN,
                Attribute.TOKEN,
                Attribute.PRIVATE,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.ALWAYS_SENSITIVE,
                Attribute.NEVER_EXTRACTABLE,
                Attribute.WRAP,
                Attribute.UNWRAP,
                Attribute.ENCRYPT,
                Attribute.DECRYPT,
            ]
        )
        assert attrs == {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE_LEN: 32,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ALWAYS_SENSITIVE: True,
            Attribute.NEVER_EXTRACTABLE: True,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
        }
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            obj[Attribute.VALUE]
    finally:
        session.close()


@pytest.mark.parametrize(
    "label",
    [
        "keyledger-domain-wrap",
        "keyledger-kek-",
        "kek-1",
        "keyledger-kek-a\nb",
        "keyledger-kek-é",
        "keyledger-kek-" + "x" * 115,
    ],
)
def test_invalid_kek_labels_are_refused(softhsm_keystore: Pkcs11KeyStore, label: str) -> None:
    legacy = softhsm_keystore.generate_symmetric_key()
    with pytest.raises(HsmError, match="invalid KEK label"):
        softhsm_keystore.generate_symmetric_key(kek=label)
    with pytest.raises(HsmError, match="invalid KEK label"):
        softhsm_keystore.destroy_kek(label)
    with pytest.raises(HsmError, match="invalid KEK label"):
        softhsm_keystore.encrypt(
            MaterialRef(hashlib.sha256(b"\0" * 40).hexdigest(), b"\0" * 40, kek=label), b"x", b""
        )
    assert _round_trips(softhsm_keystore, legacy)  # the domain key survived "destroy"
    assert len(_objects_labelled(softhsm_keystore, DOMAIN_KEY_LABEL)) == 1


def test_eight_threads_on_two_stores_create_one_kek_per_label(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings
) -> None:
    labels = [_kek() for _ in range(4)]
    second = open_keystore(softhsm_settings)
    stores = [softhsm_keystore, second]
    barrier = threading.Barrier(8)
    made: list[MaterialRef] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            store = stores[n % 2]
            barrier.wait()
            for i in range(8):
                m = store.generate_symmetric_key(kek=labels[(n + i) % 4])
                assert _round_trips(store, m)
                made.append(m)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        second.close()
    assert errors == []
    assert len(made) == 64
    for label in labels:
        assert len(_objects_labelled(softhsm_keystore, label)) == 1
