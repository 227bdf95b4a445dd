from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from ledger.errors import HsmError, InvalidCiphertextError
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore, open_keystore
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
