"""Asymmetric SIGN_VERIFY keys on real SoftHSM2, on SQLite and PostgreSQL: signatures
interoperate with `cryptography` and `openssl dgst -verify` against GetPublicKey's DER."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ledger.domain.key_specs import SIGNING_ALGORITHMS_BY_SPEC
from ledger.errors import (
    InvalidKeyUsageError,
    KMSInvalidSignatureError,
    UnsupportedOperationError,
    ValidationError,
)
from ledger.service import Caller, KeyLedger

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
MESSAGE = b"release v1.2.3 sha256:" + bytes(range(40))
HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def cryptography_verify(public_der: bytes, algorithm: str, signature: bytes) -> None:
    key = serialization.load_der_public_key(public_der)
    h = HASH[algorithm.rsplit("_", 1)[1]]()
    if algorithm.startswith("ECDSA"):
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, MESSAGE, ec.ECDSA(h))
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
            if algorithm.startswith("RSASSA_PSS")
            else padding.PKCS1v15()
        )
        key.verify(signature, MESSAGE, pad, h)


def openssl_verify(tmp: Path, public_der: bytes, algorithm: str, signature: bytes) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required for the interop test")
    (tmp / "pub.der").write_bytes(public_der)
    (tmp / "msg").write_bytes(MESSAGE)
    (tmp / "sig").write_bytes(signature)
    bits = algorithm.rsplit("_", 1)[1]
    args = ["openssl", "dgst", f"-sha{bits}", "-keyform", "DER", "-verify", str(tmp / "pub.der")]
    if algorithm.startswith("RSASSA_PSS"):
        args += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", f"rsa_pss_saltlen:{int(bits) // 8}"]
    args += ["-signature", str(tmp / "sig"), str(tmp / "msg")]
    out = subprocess.run(args, capture_output=True, check=False)
    assert out.returncode == 0 and b"Verified OK" in out.stdout, out


@pytest.mark.parametrize("spec", list(SIGNING_ALGORITHMS_BY_SPEC))
def test_every_signing_spec_and_algorithm_interoperates(
    ledger: KeyLedger, tmp_path: Path, spec: str
) -> None:
    md = ledger.create_key(caller=CALLER, key_spec=spec, key_usage="SIGN_VERIFY")["KeyMetadata"]
    assert md["SigningAlgorithms"] == SIGNING_ALGORITHMS_BY_SPEC[spec]
    pub = ledger.get_public_key(caller=CALLER, key_id=md["KeyId"])
    assert pub["KeySpec"] == spec and pub["KeyUsage"] == "SIGN_VERIFY"
    produced: list[bytes] = []
    for algorithm in SIGNING_ALGORITHMS_BY_SPEC[spec]:
        signature = ledger.sign(
            caller=CALLER, key_id=md["KeyId"], message=MESSAGE, signing_algorithm=algorithm
        )["Signature"]
        cryptography_verify(pub["PublicKey"], algorithm, signature)
        openssl_verify(tmp_path, pub["PublicKey"], algorithm, signature)
        digest = hashlib.new(f"sha{algorithm.rsplit('_', 1)[1]}", MESSAGE).digest()
        by_digest = ledger.sign(
            caller=CALLER, key_id=md["Arn"], message=digest, message_type="DIGEST",
            signing_algorithm=algorithm,
        )["Signature"]  # fmt: skip
        cryptography_verify(pub["PublicKey"], algorithm, by_digest)
        assert ledger.verify(
            caller=CALLER, key_id=md["KeyId"], message=MESSAGE, signature=signature,
            signing_algorithm=algorithm,
        )["SignatureValid"]  # fmt: skip
        bad = bytearray(signature)
        bad[len(bad) // 2] ^= 0x01
        before = ledger.db.head_seq()
        with pytest.raises(KMSInvalidSignatureError):
            ledger.verify(
                caller=CALLER, key_id=md["KeyId"], message=MESSAGE, signature=bytes(bad),
                signing_algorithm=algorithm,
            )  # fmt: skip
        failure = ledger.db.read_records(before, 5)
        assert [r.event()["error_code"] for r in failure] == ["KMSInvalidSignatureException"]
        produced += [signature, by_digest]
    stored = b"".join(r.data for r in ledger.db.read_records(0, 1000))
    for secret in (*produced, MESSAGE):
        assert base64.b64encode(secret) not in stored and secret.hex().encode() not in stored


def test_signing_key_usage_and_digest_checks_follow_aws(ledger: KeyLedger) -> None:
    ec_key = ledger.create_key(caller=CALLER, key_spec="ECC_NIST_P256", key_usage="SIGN_VERIFY")[
        "KeyMetadata"
    ]["KeyId"]
    sym = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    arn = ledger.settings.key_arn
    with pytest.raises(InvalidKeyUsageError) as info:
        ledger.sign(caller=CALLER, key_id=sym, message=b"m", signing_algorithm="ECDSA_SHA_256")
    assert (
        info.value.message
        == f"{arn(sym)} key usage is ENCRYPT_DECRYPT which is not valid for Sign."
    )
    with pytest.raises(InvalidKeyUsageError, match="incompatible with key spec ECC_NIST_P256"):
        ledger.sign(caller=CALLER, key_id=ec_key, message=b"m", signing_algorithm="ECDSA_SHA_384")
    with pytest.raises(ValidationError) as info:
        ledger.sign(
            caller=CALLER, key_id=ec_key, message=b"x" * 31, message_type="DIGEST",
            signing_algorithm="ECDSA_SHA_256",
        )  # fmt: skip
    assert info.value.message == "Digest is invalid length for algorithm ECDSA_SHA_256."
    with pytest.raises(ValidationError, match="at 'message'"):
        ledger.sign(
            caller=CALLER, key_id=ec_key, message=b"m" * 4097, signing_algorithm="ECDSA_SHA_256"
        )
    with pytest.raises(InvalidKeyUsageError, match="SIGN_VERIFY which is not valid for Encrypt"):
        ledger.encrypt(caller=CALLER, key_id=ec_key, plaintext=b"x")
    with pytest.raises(UnsupportedOperationError):
        ledger.get_public_key(caller=CALLER, key_id=sym)
    with pytest.raises(ValidationError, match="KeyUsage GENERATE_VERIFY_MAC is not compatible"):
        ledger.create_key(caller=CALLER, key_spec="RSA_2048", key_usage="GENERATE_VERIFY_MAC")
    with pytest.raises(ValidationError, match="You must specify a KeyUsage value"):
        ledger.create_key(caller=CALLER, key_spec="ECC_NIST_P256")
    with pytest.raises(UnsupportedOperationError):
        ledger.enable_key_rotation(caller=CALLER, key_id=ec_key)
