"""HMAC KMS keys (HMAC_224/256/384/512, GENERATE_VERIFY_MAC) on real SoftHSM2, on
SQLite and PostgreSQL: GenerateMac, VerifyMac, and AWS's key usage enforcement."""

from __future__ import annotations

import base64

import pytest

from ledger.errors import (
    InvalidKeyUsageError,
    KMSInvalidMacError,
    UnsupportedOperationError,
    ValidationError,
)
from ledger.service import Caller, KeyLedger
from projections.catalog import KeyCatalog

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
SPECS = {"HMAC_224": 28, "HMAC_256": 32, "HMAC_384": 48, "HMAC_512": 64}


def hmac_key(ledger: KeyLedger, spec: str) -> dict[str, object]:
    md: dict[str, object] = ledger.create_key(
        caller=CALLER, key_spec=spec, key_usage="GENERATE_VERIFY_MAC"
    )["KeyMetadata"]
    return md


@pytest.mark.parametrize(("spec", "mac_len"), list(SPECS.items()))
def test_generate_and_verify_mac_for_every_hmac_key_spec(
    ledger: KeyLedger, spec: str, mac_len: int
) -> None:
    md = hmac_key(ledger, spec)
    algorithm = f"HMAC_SHA_{spec[5:]}"
    assert md["MacAlgorithms"] == [algorithm] and "EncryptionAlgorithms" not in md
    assert md["KeyUsage"] == "GENERATE_VERIFY_MAC" and md["KeySpec"] == spec
    described = KeyCatalog(ledger.db).describe_key(
        __import__("uuid").UUID(str(md["KeyId"])), str(md["Arn"])
    )["KeyMetadata"]
    assert described == ledger.describe_key(caller=CALLER, key_id=str(md["KeyId"]))["KeyMetadata"]
    out = ledger.generate_mac(
        caller=CALLER, key_id=str(md["KeyId"]), message=b"pay 10 EUR", mac_algorithm=algorithm
    )
    assert len(out["Mac"]) == mac_len and out["MacAlgorithm"] == algorithm
    again = ledger.generate_mac(
        caller=CALLER, key_id=str(md["Arn"]), message=b"pay 10 EUR", mac_algorithm=algorithm
    )
    assert again["Mac"] == out["Mac"]
    ok = ledger.verify_mac(
        caller=CALLER, key_id=str(md["KeyId"]), message=b"pay 10 EUR",
        mac_algorithm=algorithm, mac=out["Mac"],
    )  # fmt: skip
    assert ok["MacValid"] is True
    before = ledger.db.head_seq()
    forged = bytes([out["Mac"][0] ^ 1]) + out["Mac"][1:]
    for message, mac in ((b"pay 10 EUR", forged), (b"pay 99 EUR", out["Mac"])):
        with pytest.raises(KMSInvalidMacError):
            ledger.verify_mac(
                caller=CALLER, key_id=str(md["KeyId"]), message=message,
                mac_algorithm=algorithm, mac=mac,
            )  # fmt: skip
    failed = [r.event() for r in ledger.db.read_records(before, 10)]
    assert [e["error_code"] for e in failed] == ["KMSInvalidMacException"] * 2
    stored = b"".join(r.data for r in ledger.db.read_records(0, 1000))
    for form in (out["Mac"], base64.b64encode(out["Mac"]), out["Mac"].hex().encode()):
        assert form not in stored


def test_key_usage_and_algorithm_are_enforced_as_aws_reports_them(ledger: KeyLedger) -> None:
    mac_key = str(hmac_key(ledger, "HMAC_224")["KeyId"])
    enc_key = str(ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"])
    arn = ledger.settings.key_arn
    with pytest.raises(InvalidKeyUsageError) as info:
        ledger.generate_mac(
            caller=CALLER, key_id=enc_key, message=b"m", mac_algorithm="HMAC_SHA_256"
        )
    assert info.value.message == (
        f"{arn(enc_key)} key usage is ENCRYPT_DECRYPT which is not valid for GenerateMac."
    )
    with pytest.raises(InvalidKeyUsageError) as info:
        ledger.generate_mac(
            caller=CALLER, key_id=mac_key, message=b"m", mac_algorithm="HMAC_SHA_256"
        )
    assert info.value.message == "Algorithm HMAC_SHA_256 is incompatible with key spec HMAC_224."
    with pytest.raises(
        InvalidKeyUsageError, match="GENERATE_VERIFY_MAC which is not valid for Encrypt"
    ):
        ledger.encrypt(caller=CALLER, key_id=mac_key, plaintext=b"x")
    with pytest.raises(InvalidKeyUsageError, match="not valid for GenerateDataKey"):
        ledger.generate_data_key(caller=CALLER, key_id=mac_key, key_spec="AES_256")
    with pytest.raises(ValidationError, match="at 'macAlgorithm'"):
        ledger.generate_mac(caller=CALLER, key_id=mac_key, message=b"m", mac_algorithm="INVALID")
    with pytest.raises(ValidationError, match="You must specify a KeyUsage value"):
        ledger.create_key(caller=CALLER, key_spec="HMAC_256")
    with pytest.raises(ValidationError, match="KeyUsage ENCRYPT_DECRYPT is not compatible"):
        ledger.create_key(caller=CALLER, key_spec="HMAC_256", key_usage="ENCRYPT_DECRYPT")
    with pytest.raises(ValidationError, match="at 'message'"):
        ledger.generate_mac(
            caller=CALLER, key_id=mac_key, message=b"m" * 4097, mac_algorithm="HMAC_SHA_224"
        )
    with pytest.raises(UnsupportedOperationError):
        ledger.rotate_key_on_demand(caller=CALLER, key_id=mac_key)
    with pytest.raises(UnsupportedOperationError):
        ledger.enable_key_rotation(caller=CALLER, key_id=mac_key)
