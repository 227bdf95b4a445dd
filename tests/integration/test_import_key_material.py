"""Imported key material (BYOK) on real SoftHSM2, on SQLite and PostgreSQL: material
wrapped with `cryptography` for each wrapping algorithm imports and works."""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from ledger import envelope
from ledger.bootstrap import open_ledger
from ledger.clock import FixedClock
from ledger.errors import (
    ExpiredImportTokenError,
    InvalidCiphertextError,
    InvalidImportTokenError,
    KMSInvalidStateError,
    UnsupportedOperationError,
    ValidationError,
)
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings
from projections.catalog import KeyCatalog
from projections.maintenance import run_maintenance

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def wrap(public_der: bytes, algorithm: str, material: bytes) -> bytes:
    public = serialization.load_der_public_key(public_der)
    assert isinstance(public, rsa.RSAPublicKey)
    h = hashes.SHA1() if algorithm.endswith("SHA_1") else hashes.SHA256()
    pad = padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public.encrypt(material, pad)
    ephemeral = os.urandom(32)
    return public.encrypt(ephemeral, pad) + aes_key_wrap_with_padding(ephemeral, material)


@pytest.fixture
def byok(
    ledger_settings: Settings, softhsm_keystore: Pkcs11KeyStore
) -> tuple[KeyLedger, FixedClock]:
    clock = FixedClock(T0)
    app = open_ledger(ledger_settings, keystore=softhsm_keystore, clock=clock)
    yield app, clock  # type: ignore[misc]
    app.close()


@pytest.mark.parametrize(
    "algorithm",
    [
        "RSAES_OAEP_SHA_1",
        "RSAES_OAEP_SHA_256",
        "RSA_AES_KEY_WRAP_SHA_1",
        "RSA_AES_KEY_WRAP_SHA_256",
    ],
)
def test_symmetric_material_wrapped_with_cryptography_imports_and_is_that_material(
    byok: tuple[KeyLedger, FixedClock], algorithm: str
) -> None:
    ledger, _ = byok
    md = ledger.create_key(caller=CALLER, origin="EXTERNAL")["KeyMetadata"]
    assert md["KeyState"] == "PendingImport" and md["Origin"] == "EXTERNAL"
    with pytest.raises(KMSInvalidStateError, match="pending import"):
        ledger.encrypt(caller=CALLER, key_id=md["KeyId"], plaintext=b"x")
    params = ledger.get_parameters_for_import(
        caller=CALLER, key_id=md["KeyId"], wrapping_algorithm=algorithm,
        wrapping_key_spec="RSA_2048",
    )  # fmt: skip
    material = os.urandom(32)
    ledger.import_key_material(
        caller=CALLER, key_id=md["KeyId"], import_token=params["ImportToken"],
        encrypted_key_material=wrap(params["PublicKey"], algorithm, material),
    )  # fmt: skip
    out = ledger.describe_key(caller=CALLER, key_id=md["KeyId"])["KeyMetadata"]
    assert out["KeyState"] == "Enabled" and out["ExpirationModel"] == "KEY_MATERIAL_DOES_NOT_EXPIRE"
    blob = ledger.encrypt(
        caller=CALLER, key_id=md["KeyId"], plaintext=b"mine", encryption_context={"a": "b"}
    )["CiphertextBlob"]
    env = envelope.parse(blob)  # the imported key really is our material:
    aad = envelope.aad(env.key_id, env.version, {"a": "b"})
    assert AESGCM(material).decrypt(env.iv, env.ciphertext, aad) == b"mine"
    stored = b"".join(r.data for r in ledger.db.read_records(0, 1000))
    assert material.hex().encode() not in stored
    assert params["ImportToken"] not in stored


def test_hmac_material_imports_and_macs_like_python(byok: tuple[KeyLedger, FixedClock]) -> None:
    ledger, _ = byok
    md = ledger.create_key(
        caller=CALLER, key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC", origin="EXTERNAL"
    )["KeyMetadata"]
    params = ledger.get_parameters_for_import(
        caller=CALLER, key_id=md["KeyId"], wrapping_algorithm="RSAES_OAEP_SHA_256",
        wrapping_key_spec="RSA_3072",
    )  # fmt: skip
    material = os.urandom(32)
    ledger.import_key_material(
        caller=CALLER, key_id=md["KeyId"], import_token=params["ImportToken"],
        encrypted_key_material=wrap(params["PublicKey"], "RSAES_OAEP_SHA_256", material),
    )  # fmt: skip
    mac = ledger.generate_mac(
        caller=CALLER, key_id=md["KeyId"], message=b"m", mac_algorithm="HMAC_SHA_256"
    )["Mac"]
    assert mac == hmac.new(material, b"m", hashlib.sha256).digest()


def test_import_errors_expiry_and_deletion_follow_aws(byok: tuple[KeyLedger, FixedClock]) -> None:
    ledger, clock = byok
    md = ledger.create_key(caller=CALLER, origin="EXTERNAL")["KeyMetadata"]
    key = md["KeyId"]
    alg = "RSAES_OAEP_SHA_1"
    params = ledger.get_parameters_for_import(
        caller=CALLER, key_id=key, wrapping_algorithm=alg, wrapping_key_spec="RSA_2048"
    )
    material = os.urandom(32)
    good = wrap(params["PublicKey"], alg, material)
    imp = ledger.import_key_material
    with pytest.raises(ValidationError, match="validTo date must be set"):
        imp(caller=CALLER, key_id=key, import_token=params["ImportToken"],
            encrypted_key_material=good, expiration_model="KEY_MATERIAL_EXPIRES")  # fmt: skip
    with pytest.raises(InvalidImportTokenError):
        imp(caller=CALLER, key_id=key, import_token=b"not-a-token", encrypted_key_material=good)
    other = (
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(InvalidCiphertextError):  # wrapped with the wrong key
        imp(caller=CALLER, key_id=key, import_token=params["ImportToken"],
            encrypted_key_material=wrap(other, alg, material))  # fmt: skip
    with pytest.raises(ValidationError):  # wrong length for a symmetric key
        imp(caller=CALLER, key_id=key, import_token=params["ImportToken"],
            encrypted_key_material=wrap(params["PublicKey"], alg, os.urandom(16)))  # fmt: skip
    aws_key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    with pytest.raises(UnsupportedOperationError, match="origin is AWS_KMS"):
        ledger.get_parameters_for_import(
            caller=CALLER, key_id=aws_key, wrapping_algorithm=alg, wrapping_key_spec="RSA_2048"
        )
    clock.advance(timedelta(hours=25))
    with pytest.raises(ExpiredImportTokenError):
        imp(
            caller=CALLER,
            key_id=key,
            import_token=params["ImportToken"],
            encrypted_key_material=good,
        )
    params = ledger.get_parameters_for_import(
        caller=CALLER, key_id=key, wrapping_algorithm=alg, wrapping_key_spec="RSA_2048"
    )
    valid_to = clock.now() + timedelta(days=10)
    wrapped = wrap(params["PublicKey"], alg, material)
    imp(caller=CALLER, key_id=key, import_token=params["ImportToken"],
        encrypted_key_material=wrapped, valid_to=valid_to)  # fmt: skip
    blob = ledger.encrypt(caller=CALLER, key_id=key, plaintext=b"before expiry")["CiphertextBlob"]
    catalog = KeyCatalog(ledger.db)
    clock.advance(timedelta(days=11))
    assert run_maintenance(ledger, catalog) == [("DeleteExpiredKeyMaterial", md["Arn"])]
    assert (
        ledger.describe_key(caller=CALLER, key_id=key)["KeyMetadata"]["KeyState"] == "PendingImport"
    )
    with pytest.raises(KMSInvalidStateError, match="pending import"):
        ledger.decrypt(caller=CALLER, ciphertext_blob=blob)
    # Re-importing the same material brings old ciphertexts back.
    params = ledger.get_parameters_for_import(
        caller=CALLER, key_id=key, wrapping_algorithm=alg, wrapping_key_spec="RSA_2048"
    )
    imp(caller=CALLER, key_id=key, import_token=params["ImportToken"],
        encrypted_key_material=wrap(params["PublicKey"], alg, material))  # fmt: skip
    assert ledger.decrypt(caller=CALLER, ciphertext_blob=blob)["Plaintext"] == b"before expiry"
    ledger.delete_imported_key_material(caller=CALLER, key_id=key)
    assert (
        catalog.describe_key(__import__("uuid").UUID(key), md["Arn"])["KeyMetadata"]["KeyState"]
        == "PendingImport"
    )
