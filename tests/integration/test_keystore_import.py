"""Importing key material into SoftHSM2 through Pkcs11KeyStore (new_import_wrapping_key,
import_key_material): material wrapped with ``cryptography`` exactly as AWS KMS clients
wrap it imports, and the imported key *is* that material (AES-GCM and HMAC results
match ``cryptography``/``hmac`` with the original bytes)."""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from ledger.errors import HsmError, InvalidCiphertextError, ValidationError
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore, open_keystore
from ledger.keystore.port import MaterialRef
from ledger.settings import Settings

pytestmark = pytest.mark.softhsm

ALGORITHMS = [
    "RSAES_OAEP_SHA_1",
    "RSAES_OAEP_SHA_256",
    "RSA_AES_KEY_WRAP_SHA_1",
    "RSA_AES_KEY_WRAP_SHA_256",
]
MACS = {
    "HMAC_224": ("HMAC_SHA_224", hashlib.sha224),
    "HMAC_256": ("HMAC_SHA_256", hashlib.sha256),
    "HMAC_384": ("HMAC_SHA_384", hashlib.sha384),
    "HMAC_512": ("HMAC_SHA_512", hashlib.sha512),
}


def wrap(public_der: bytes, algorithm: str, material: bytes) -> bytes:
    """What an AWS KMS client sends for ``algorithm``."""
    public = serialization.load_der_public_key(public_der)
    assert isinstance(public, rsa.RSAPublicKey)
    h: hashes.HashAlgorithm = hashes.SHA1() if algorithm.endswith("SHA_1") else hashes.SHA256()
    pad = padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public.encrypt(material, pad)
    ephemeral = os.urandom(32)
    return public.encrypt(ephemeral, pad) + aes_key_wrap_with_padding(ephemeral, material)


def new_kek() -> str:
    return f"keyledger-kek-import-{uuid.uuid4()}"


@pytest.fixture(scope="module")
def wrapping_2048(softhsm_keystore: Pkcs11KeyStore) -> tuple[MaterialRef, bytes]:
    return softhsm_keystore.new_import_wrapping_key("RSA_2048")


def assert_aes_is(store: Pkcs11KeyStore, material: MaterialRef, key: bytes) -> None:
    aad = b"ctx"
    iv, ct = store.encrypt(material, b"hello import", aad)
    assert AESGCM(key).decrypt(iv, ct, aad) == b"hello import"
    iv2 = os.urandom(12)
    assert store.decrypt(material, iv2, AESGCM(key).encrypt(iv2, b"back", aad), aad) == b"back"


def test_wrapping_key_shape(wrapping_2048: tuple[MaterialRef, bytes]) -> None:
    material, public_der = wrapping_2048
    assert material.kind == "IMPORT:RSA_2048"
    assert material.kek is None
    assert material.material_id == hashlib.sha256(material.wrapped).hexdigest()
    public = serialization.load_der_public_key(public_der)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    assert public.public_numbers().e == 65537


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_import_aes(
    softhsm_keystore: Pkcs11KeyStore, wrapping_2048: tuple[MaterialRef, bytes], algorithm: str
) -> None:
    wrapping, public_der = wrapping_2048
    key = os.urandom(32)
    kek = new_kek()
    material = softhsm_keystore.import_key_material(
        wrapping, algorithm, wrap(public_der, algorithm, key), "AES", kek
    )
    assert material.kind == "AES"
    assert material.kek == kek
    assert material.material_id == hashlib.sha256(material.wrapped).hexdigest()
    assert key not in material.wrapped
    assert_aes_is(softhsm_keystore, material, key)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    ("kind", "length"),
    [
        ("HMAC_224", 28),
        ("HMAC_224", 29),
        ("HMAC_224", 64),
        ("HMAC_256", 32),
        ("HMAC_256", 45),
        ("HMAC_384", 48),
        ("HMAC_384", 121),
        ("HMAC_512", 64),
        ("HMAC_512", 128),
    ],
)
def test_import_hmac(
    softhsm_keystore: Pkcs11KeyStore,
    wrapping_2048: tuple[MaterialRef, bytes],
    algorithm: str,
    kind: str,
    length: int,
) -> None:
    if algorithm.startswith("RSAES_OAEP") and length > 190:
        pytest.skip("too long for RSA-OAEP with a 2048-bit key")
    wrapping, public_der = wrapping_2048
    key = os.urandom(length)
    material = softhsm_keystore.import_key_material(
        wrapping, algorithm, wrap(public_der, algorithm, key), kind, new_kek()
    )
    mac_algorithm, digest = MACS[kind]
    message = b"message to MAC"
    expected = hmac.new(key, message, digest).digest()
    assert softhsm_keystore.generate_mac(material, mac_algorithm, message) == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_import_with_rsa_4096(softhsm_keystore: Pkcs11KeyStore, algorithm: str) -> None:
    wrapping, public_der = softhsm_keystore.new_import_wrapping_key("RSA_4096")
    assert wrapping.kind == "IMPORT:RSA_4096"
    key = os.urandom(32)
    material = softhsm_keystore.import_key_material(
        wrapping, algorithm, wrap(public_der, algorithm, key), "AES", new_kek()
    )
    assert_aes_is(softhsm_keystore, material, key)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_wrong_wrapping_key(
    softhsm_keystore: Pkcs11KeyStore, wrapping_2048: tuple[MaterialRef, bytes], algorithm: str
) -> None:
    wrapping, _ = wrapping_2048
    other = rsa.generate_private_key(65537, 2048).public_key()
    other_der = other.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InvalidCiphertextError) as info:
        softhsm_keystore.import_key_material(
            wrapping, algorithm, wrap(other_der, algorithm, os.urandom(32)), "AES", new_kek()
        )
    assert str(info.value) == ""


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("where", ["rsa", "tail", "truncated"])
def test_corrupted(
    softhsm_keystore: Pkcs11KeyStore,
    wrapping_2048: tuple[MaterialRef, bytes],
    algorithm: str,
    where: str,
) -> None:
    wrapping, public_der = wrapping_2048
    blob = bytearray(wrap(public_der, algorithm, os.urandom(32)))
    if where == "rsa":
        blob[100] ^= 0x01
    elif where == "tail":
        blob[-1] ^= 0x01
    else:
        del blob[-8:]
    with pytest.raises(InvalidCiphertextError) as info:
        softhsm_keystore.import_key_material(wrapping, algorithm, bytes(blob), "AES", new_kek())
    assert str(info.value) == ""


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    ("kind", "length"),
    [
        ("AES", 16),
        ("AES", 31),
        ("AES", 33),
        ("AES", 40),
        ("HMAC_224", 27),
        ("HMAC_224", 65),
        ("HMAC_256", 31),
        ("HMAC_384", 47),
        ("HMAC_512", 63),
        ("HMAC_512", 129),
    ],
)
def test_wrong_length(
    softhsm_keystore: Pkcs11KeyStore,
    wrapping_2048: tuple[MaterialRef, bytes],
    algorithm: str,
    kind: str,
    length: int,
) -> None:
    wrapping, public_der = wrapping_2048
    with pytest.raises(ValidationError, match=kind):
        softhsm_keystore.import_key_material(
            wrapping, algorithm, wrap(public_der, algorithm, os.urandom(length)), kind, new_kek()
        )


def test_refuses_non_import_material(
    softhsm_keystore: Pkcs11KeyStore, wrapping_2048: tuple[MaterialRef, bytes]
) -> None:
    wrapping, public_der = wrapping_2048
    blob = wrap(public_der, "RSAES_OAEP_SHA_1", os.urandom(32))
    aes = softhsm_keystore.generate_symmetric_key(new_kek())
    with pytest.raises(HsmError):
        softhsm_keystore.import_key_material(aes, "RSAES_OAEP_SHA_1", blob, "AES", new_kek())
    with pytest.raises(HsmError):
        softhsm_keystore.import_key_material(wrapping, "RSA_OAEP_SHA_512", blob, "AES", new_kek())
    with pytest.raises(HsmError):
        softhsm_keystore.import_key_material(
            wrapping, "RSAES_OAEP_SHA_1", blob, "RSA_2048", new_kek()
        )
    with pytest.raises(HsmError):
        softhsm_keystore.new_import_wrapping_key("RSA_1024")


def test_second_store_uses_imported_material_and_wrapping_key(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings
) -> None:
    wrapping, public_der = softhsm_keystore.new_import_wrapping_key("RSA_2048")
    key = os.urandom(32)
    mac_key = os.urandom(48)
    aes = softhsm_keystore.import_key_material(
        wrapping, "RSAES_OAEP_SHA_1", wrap(public_der, "RSAES_OAEP_SHA_1", key), "AES", new_kek()
    )
    # Simulates a restart: a new store knows only what the ledger stored.
    reopened_wrapping = MaterialRef(
        material_id=wrapping.material_id, wrapped=wrapping.wrapped, kek=None, kind=wrapping.kind
    )
    reopened_aes = MaterialRef(
        material_id=aes.material_id, wrapped=aes.wrapped, kek=aes.kek, kind=aes.kind
    )
    with open_keystore(softhsm_settings) as second:
        assert_aes_is(second, reopened_aes, key)
        mac = second.import_key_material(
            reopened_wrapping,
            "RSA_AES_KEY_WRAP_SHA_256",
            wrap(public_der, "RSA_AES_KEY_WRAP_SHA_256", mac_key),
            "HMAC_384",
            new_kek(),
        )
        assert (
            second.generate_mac(mac, "HMAC_SHA_384", b"m")
            == hmac.new(mac_key, b"m", hashlib.sha384).digest()
        )
    assert (
        softhsm_keystore.generate_mac(mac, "HMAC_SHA_384", b"m")
        == hmac.new(mac_key, b"m", hashlib.sha384).digest()
    )
