"""RSA ENCRYPT_DECRYPT keys, ECC KEY_AGREEMENT keys and data key pairs on real
SoftHSM2, on SQLite and PostgreSQL, checked against `cryptography`."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ledger.errors import (
    InvalidCiphertextError,
    InvalidKeyUsageError,
    ValidationError,
)
from ledger.service import Caller, KeyLedger

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
CURVES = {
    "ECC_NIST_P256": ec.SECP256R1(),
    "ECC_NIST_P384": ec.SECP384R1(),
    "ECC_NIST_P521": ec.SECP521R1(),
}


def oaep(algorithm: str) -> padding.OAEP:
    h = hashes.SHA1() if algorithm.endswith("SHA_1") else hashes.SHA256()
    return padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)


def test_rsa_encryption_keys_decrypt_what_cryptography_encrypts_and_enforce_limits(
    ledger: KeyLedger,
) -> None:
    md = ledger.create_key(caller=CALLER, key_spec="RSA_2048", key_usage="ENCRYPT_DECRYPT")[
        "KeyMetadata"
    ]
    assert md["EncryptionAlgorithms"] == ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
    public = serialization.load_der_public_key(
        ledger.get_public_key(caller=CALLER, key_id=md["KeyId"])["PublicKey"]
    )
    assert isinstance(public, rsa.RSAPublicKey)
    for algorithm, limit in (("RSAES_OAEP_SHA_1", 214), ("RSAES_OAEP_SHA_256", 190)):
        secret = b"s" * limit
        ours = ledger.encrypt(
            caller=CALLER, key_id=md["KeyId"], plaintext=secret, encryption_algorithm=algorithm
        )["CiphertextBlob"]
        theirs = public.encrypt(secret, oaep(algorithm))
        for blob in (ours, theirs):
            out = ledger.decrypt(
                caller=CALLER, key_id=md["KeyId"], ciphertext_blob=blob,
                encryption_algorithm=algorithm,
            )  # fmt: skip
            assert out["Plaintext"] == secret and out["EncryptionAlgorithm"] == algorithm
        with pytest.raises(ValidationError) as info:
            ledger.encrypt(
                caller=CALLER, key_id=md["KeyId"], plaintext=b"s" * (limit + 1),
                encryption_algorithm=algorithm,
            )  # fmt: skip
        assert info.value.message == (
            f"Algorithm {algorithm} and key spec RSA_2048 cannot encrypt data larger than "
            f"{limit} bytes."
        )
    bad = bytearray(theirs)
    bad[5] ^= 1
    with pytest.raises(InvalidCiphertextError):
        ledger.decrypt(
            caller=CALLER, key_id=md["KeyId"], ciphertext_blob=bytes(bad),
            encryption_algorithm="RSAES_OAEP_SHA_256",
        )  # fmt: skip
    with pytest.raises(InvalidCiphertextError):  # right key, wrong OAEP hash
        ledger.decrypt(
            caller=CALLER, key_id=md["KeyId"], ciphertext_blob=theirs,
            encryption_algorithm="RSAES_OAEP_SHA_1",
        )  # fmt: skip
    with pytest.raises(InvalidKeyUsageError):
        ledger.encrypt(caller=CALLER, key_id=md["KeyId"], plaintext=b"x")  # SYMMETRIC_DEFAULT


@pytest.mark.parametrize("spec", list(CURVES))
def test_derive_shared_secret_matches_cryptography_ecdh(ledger: KeyLedger, spec: str) -> None:
    md = ledger.create_key(caller=CALLER, key_spec=spec, key_usage="KEY_AGREEMENT")["KeyMetadata"]
    assert md["KeyAgreementAlgorithms"] == ["ECDH"]
    ours = serialization.load_der_public_key(
        ledger.get_public_key(caller=CALLER, key_id=md["KeyId"])["PublicKey"]
    )
    peer = ec.generate_private_key(CURVES[spec])
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = ledger.derive_shared_secret(
        caller=CALLER, key_id=md["KeyId"], key_agreement_algorithm="ECDH", public_key=peer_der
    )
    assert isinstance(ours, ec.EllipticCurvePublicKey)
    assert out["SharedSecret"] == peer.exchange(ec.ECDH(), ours)
    with pytest.raises(ValidationError):
        ledger.derive_shared_secret(
            caller=CALLER,
            key_id=md["KeyId"],
            key_agreement_algorithm="INVALID",
            public_key=peer_der,
        )
    sym = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    with pytest.raises(InvalidKeyUsageError, match="not valid for DeriveSharedSecret"):
        ledger.derive_shared_secret(
            caller=CALLER, key_id=sym, key_agreement_algorithm="ECDH", public_key=peer_der
        )
    stored = b"".join(r.data for r in ledger.db.read_records(0, 1000))
    assert out["SharedSecret"].hex().encode() not in stored


@pytest.mark.parametrize("spec", ["RSA_2048", "ECC_NIST_P256", "ECC_NIST_P521", "ECC_SECG_P256K1"])
def test_data_key_pair_private_keys_decrypted_through_decrypt_match_their_public_keys(
    ledger: KeyLedger, spec: str
) -> None:
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    ctx = {"purpose": "pair"}
    pair = ledger.generate_data_key_pair(
        caller=CALLER, key_id=key, key_pair_spec=spec, encryption_context=ctx
    )
    private = ledger.decrypt(
        caller=CALLER, ciphertext_blob=pair["PrivateKeyCiphertextBlob"], encryption_context=ctx
    )["Plaintext"]
    assert private == pair["PrivateKeyPlaintext"]
    loaded = serialization.load_der_private_key(private, password=None)
    derived = loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert derived == pair["PublicKey"]
    without = ledger.generate_data_key_pair_without_plaintext(
        caller=CALLER, key_id=key, key_pair_spec=spec, encryption_context=ctx
    )
    assert "PrivateKeyPlaintext" not in without
    stored = b"".join(r.data for r in ledger.db.read_records(0, 1000))
    assert private.hex().encode() not in stored
    with pytest.raises(ValidationError):
        ledger.generate_data_key_pair(caller=CALLER, key_id=key, key_pair_spec="RSA_1024")


def test_data_keys_need_a_symmetric_key(ledger: KeyLedger) -> None:
    rsa_key = ledger.create_key(caller=CALLER, key_spec="RSA_2048", key_usage="ENCRYPT_DECRYPT")[
        "KeyMetadata"
    ]["KeyId"]
    before = ledger.db.head_seq()
    with pytest.raises(InvalidKeyUsageError, match="key spec RSA_2048 is not valid"):
        ledger.generate_data_key(caller=CALLER, key_id=rsa_key, key_spec="AES_256")
    with pytest.raises(InvalidKeyUsageError):
        ledger.generate_data_key_pair(caller=CALLER, key_id=rsa_key, key_pair_spec="ECC_NIST_P256")
    assert [r.event()["error_code"] for r in ledger.db.read_records(before, 5)] == [
        "InvalidKeyUsageException"
    ] * 2


def test_reencrypt_between_symmetric_and_rsa_keys(ledger: KeyLedger) -> None:
    sym = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    rsa_key = ledger.create_key(caller=CALLER, key_spec="RSA_3072", key_usage="ENCRYPT_DECRYPT")[
        "KeyMetadata"
    ]["KeyId"]
    blob = ledger.encrypt(caller=CALLER, key_id=sym, plaintext=b"roundabout")["CiphertextBlob"]
    to_rsa = ledger.re_encrypt(
        caller=CALLER, ciphertext_blob=blob, destination_key_id=rsa_key,
        destination_encryption_algorithm="RSAES_OAEP_SHA_256",
    )  # fmt: skip
    assert to_rsa["DestinationEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256"
    back = ledger.re_encrypt(
        caller=CALLER, ciphertext_blob=to_rsa["CiphertextBlob"], source_key_id=rsa_key,
        source_encryption_algorithm="RSAES_OAEP_SHA_256", destination_key_id=sym,
    )  # fmt: skip
    assert back["SourceKeyId"] == ledger.settings.key_arn(rsa_key)
    out = ledger.decrypt(caller=CALLER, ciphertext_blob=back["CiphertextBlob"])
    assert out["Plaintext"] == b"roundabout"
