"""Unmodified boto3 against a real ``keyledger serve``: every implemented KMS operation,
with round trips checked locally (``cryptography``) and errors checked by AWS code.

The module's client records each operation that answered 2xx; the last test fails when
an implemented operation was never exercised here, so a new operation needs a test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from api.backend import KmsBackend
from api.protocol import implemented_operations
from consumers.cloudtrail import cloudtrail_view
from tests.api.conftest import LedgerView, Server

# Its last test checks what the others called: with -n, a module runs whole, in order, on
# one worker (--dist loadfile, in pyproject's addopts).
pytestmark = pytest.mark.softhsm

ACCOUNT = "111122223333"
CONTEXT = {"purpose": "boto3-ops", "tenant": "t1"}
CALLED: set[str] = set()


class RecordingClient:
    """A boto3 KMS client whose operation methods add their operation's name to
    ``CALLED`` once they return (a 2xx answer); errors raise and add nothing.

    Recorded here rather than by a botocore event hook, so what counts is only that
    the test's own call returned."""

    def __init__(self, kms: Any) -> None:
        self._kms = kms
        self._operations: dict[str, str] = kms.meta.method_to_api_mapping

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._kms, name)
        operation = self._operations.get(name)
        if operation is None:
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            out = method(*args, **kwargs)
            assert out["ResponseMetadata"]["HTTPStatusCode"] < 300
            CALLED.add(operation)
            return out

        return call


@pytest.fixture(scope="module")
def client(api_server: Server, admin: dict[str, Any]) -> Iterator[Any]:
    """A boto3 KMS client as ``admin`` that records the operations that succeeded."""
    yield RecordingClient(api_server.client(admin))


def error_code(err: pytest.ExceptionInfo[ClientError]) -> str:
    code: str = err.value.response["Error"]["Code"]
    return code


def new_key(client: Any, **kwargs: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = client.create_key(**kwargs)["KeyMetadata"]
    return metadata


@pytest.fixture(scope="module")
def sym(client: Any) -> dict[str, Any]:
    return new_key(
        client, Description="boto3 symmetric", Tags=[{"TagKey": "team", "TagValue": "a"}]
    )


@pytest.fixture(scope="module")
def other(client: Any) -> dict[str, Any]:
    return new_key(client, Description="boto3 second symmetric")


@pytest.fixture(scope="module")
def sym_alias(client: Any, sym: dict[str, Any]) -> str:
    client.create_alias(AliasName="alias/boto3-sym", TargetKeyId=sym["KeyId"])
    return "alias/boto3-sym"


@pytest.fixture(scope="module")
def signer(client: Any) -> dict[str, Any]:
    return new_key(client, KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")


@pytest.fixture(scope="module")
def hmac_key(client: Any) -> dict[str, Any]:
    return new_key(client, KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")


@pytest.fixture(scope="module")
def agreement(client: Any) -> dict[str, Any]:
    return new_key(client, KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")


# --------------------------------------------------------------------------- keys


def test_create_key_returns_metadata_with_parsed_timestamps(sym: dict[str, Any]) -> None:
    assert sym["Arn"] == f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{sym['KeyId']}"
    assert isinstance(sym["CreationDate"], datetime)
    assert sym["CreationDate"].tzinfo is not None
    assert sym["KeySpec"] == "SYMMETRIC_DEFAULT" and sym["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert sym["KeyState"] == "Enabled" and sym["Enabled"] is True
    assert sym["Origin"] == "AWS_KMS" and sym["KeyManager"] == "CUSTOMER"
    assert sym["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]


def test_describe_key_by_id_arn_alias_name_and_alias_arn(
    client: Any, sym: dict[str, Any], sym_alias: str
) -> None:
    alias_arn = f"arn:aws:kms:us-east-1:{ACCOUNT}:{sym_alias}"
    for key_id in (sym["KeyId"], sym["Arn"], sym_alias, alias_arn):
        md = client.describe_key(KeyId=key_id)["KeyMetadata"]
        assert md["Arn"] == sym["Arn"], key_id
        assert md["CreationDate"] == sym["CreationDate"]


def test_update_key_description_shows_in_describe_key(client: Any, other: dict[str, Any]) -> None:
    client.update_key_description(KeyId=other["KeyId"], Description="renamed")
    assert client.describe_key(KeyId=other["KeyId"])["KeyMetadata"]["Description"] == "renamed"


def test_get_key_last_usage_names_the_last_cryptographic_call(
    client: Any, api_server: Server
) -> None:
    md = new_key(client, Description="last usage")
    fresh = client.get_key_last_usage(KeyId=md["KeyId"])
    assert fresh["KeyId"] == md["KeyId"] and not fresh.get("KeyLastUsage")
    assert fresh["TrackingStartDate"] == fresh["KeyCreationDate"] == md["CreationDate"]

    client.describe_key(KeyId=md["KeyId"])  # a read is not a cryptographic use
    blob = client.encrypt(KeyId=md["KeyId"], Plaintext=b"x")
    decrypted = client.decrypt(CiphertextBlob=blob["CiphertextBlob"])
    client.describe_key(KeyId=md["KeyId"])
    used = client.get_key_last_usage(KeyId=md["Arn"])["KeyLastUsage"]
    assert used["Operation"] == "Decrypt"
    assert used["KmsRequestId"] == decrypted["ResponseMetadata"]["RequestId"]
    assert isinstance(used["Timestamp"], datetime) and used["Timestamp"] >= md["CreationDate"]
    # The event id is the CloudTrail eventID of the Decrypt's record.
    view = LedgerView(api_server.data_dir)
    [(seq, record)] = [
        (seq, r) for seq, r in enumerate(view.records_after(0), start=1)
        if r.get("call", {}).get("request_id") == used["KmsRequestId"]
    ]  # fmt: skip
    assert record["call"]["operation"] == "Decrypt" and "error_code" not in record
    trail = cloudtrail_view(record, seq=seq, ledger_id=view.ledger_id())
    assert used["CloudTrailEventId"] == trail["eventID"]

    with pytest.raises(ClientError) as err:  # aliases are not accepted, as in AWS
        client.get_key_last_usage(KeyId="alias/boto3-sym")
    assert error_code(err) == "NotFoundException"


def test_describe_key_of_an_unknown_key_is_not_found(client: Any) -> None:
    with pytest.raises(ClientError) as err:
        client.describe_key(KeyId="00000000-0000-4000-8000-000000000000")
    assert error_code(err) == "NotFoundException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_create_hmac_key_without_key_usage_is_a_validation_error(client: Any) -> None:
    with pytest.raises(ClientError) as err:
        client.create_key(KeySpec="HMAC_256")
    assert error_code(err) == "ValidationException"


# --------------------------------------------------------------------------- symmetric


def test_encrypt_decrypt_round_trip_with_context(client: Any, sym: dict[str, Any]) -> None:
    out = client.encrypt(KeyId=sym["KeyId"], Plaintext=b"secret", EncryptionContext=CONTEXT)
    assert out["KeyId"] == sym["Arn"]
    assert out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    back = client.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert back["Plaintext"] == b"secret" and back["KeyId"] == sym["Arn"]


def test_decrypt_fails_when_encryption_context_differs(client: Any, sym: dict[str, Any]) -> None:
    blob = client.encrypt(KeyId=sym["KeyId"], Plaintext=b"x", EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    for context in ({}, {**CONTEXT, "tenant": "t2"}):
        with pytest.raises(ClientError) as err:
            client.decrypt(CiphertextBlob=blob, EncryptionContext=context)
        assert error_code(err) == "InvalidCiphertextException"


def test_decrypt_of_garbage_or_a_changed_blob_is_invalid_ciphertext(
    client: Any, sym: dict[str, Any]
) -> None:
    blob = bytearray(client.encrypt(KeyId=sym["KeyId"], Plaintext=b"x")["CiphertextBlob"])
    blob[-1] ^= 1
    for bad in (os.urandom(64), bytes(blob)):
        with pytest.raises(ClientError) as err:
            client.decrypt(CiphertextBlob=bad)
        assert error_code(err) == "InvalidCiphertextException"


def test_encrypt_accepts_alias_name_and_alias_arn(
    client: Any, sym: dict[str, Any], sym_alias: str
) -> None:
    alias_arn = f"arn:aws:kms:us-east-1:{ACCOUNT}:{sym_alias}"
    for key_id in (sym_alias, alias_arn):
        blob = client.encrypt(KeyId=key_id, Plaintext=b"via alias")["CiphertextBlob"]
        out = client.decrypt(CiphertextBlob=blob, KeyId=sym["Arn"])
        assert out["Plaintext"] == b"via alias" and out["KeyId"] == sym["Arn"]


def test_decrypt_with_another_key_id_is_incorrect_key(
    client: Any, sym: dict[str, Any], other: dict[str, Any]
) -> None:
    blob = client.encrypt(KeyId=sym["KeyId"], Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(ClientError) as err:
        client.decrypt(CiphertextBlob=blob, KeyId=other["KeyId"])
    assert error_code(err) == "IncorrectKeyException"


def test_generate_data_key_then_decrypt_gives_the_plaintext(
    client: Any, sym: dict[str, Any]
) -> None:
    for kwargs, size in (({"KeySpec": "AES_256"}, 32), ({"NumberOfBytes": 7}, 7)):
        out = client.generate_data_key(KeyId=sym["KeyId"], EncryptionContext=CONTEXT, **kwargs)
        assert len(out["Plaintext"]) == size and out["KeyId"] == sym["Arn"]
        back = client.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=CONTEXT)
        assert back["Plaintext"] == out["Plaintext"]


def test_generate_data_key_without_plaintext_decrypts_to_a_key(
    client: Any, sym: dict[str, Any]
) -> None:
    out = client.generate_data_key_without_plaintext(KeyId=sym["KeyId"], KeySpec="AES_128")
    assert "Plaintext" not in out and out["KeyId"] == sym["Arn"]
    assert len(client.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"]) == 16


def test_re_encrypt_moves_a_blob_to_another_key_and_context(
    client: Any, sym: dict[str, Any], other: dict[str, Any]
) -> None:
    blob = client.encrypt(KeyId=sym["KeyId"], Plaintext=b"move me", EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    out = client.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext=CONTEXT,
        DestinationKeyId=other["KeyId"],
        DestinationEncryptionContext={"new": "ctx"},
    )
    assert out["SourceKeyId"] == sym["Arn"] and out["KeyId"] == other["Arn"]
    back = client.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"new": "ctx"})
    assert back["Plaintext"] == b"move me" and back["KeyId"] == other["Arn"]


def test_generate_random_returns_the_requested_number_of_bytes(client: Any) -> None:
    a = client.generate_random(NumberOfBytes=48)["Plaintext"]
    b = client.generate_random(NumberOfBytes=48)["Plaintext"]
    assert len(a) == len(b) == 48 and a != b


def test_generate_data_key_pair_private_key_matches_and_decrypts(
    client: Any, sym: dict[str, Any]
) -> None:
    out = client.generate_data_key_pair(
        KeyId=sym["KeyId"], KeyPairSpec="ECC_NIST_P256", EncryptionContext=CONTEXT
    )
    private = serialization.load_der_private_key(out["PrivateKeyPlaintext"], password=None)
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public == out["PublicKey"] and out["KeyPairSpec"] == "ECC_NIST_P256"
    back = client.decrypt(CiphertextBlob=out["PrivateKeyCiphertextBlob"], EncryptionContext=CONTEXT)
    assert back["Plaintext"] == out["PrivateKeyPlaintext"]


def test_generate_data_key_pair_without_plaintext_decrypts_to_the_private_key(
    client: Any, sym: dict[str, Any]
) -> None:
    out = client.generate_data_key_pair_without_plaintext(
        KeyId=sym["KeyId"], KeyPairSpec="ECC_NIST_P256"
    )
    assert "PrivateKeyPlaintext" not in out
    plain = client.decrypt(CiphertextBlob=out["PrivateKeyCiphertextBlob"])["Plaintext"]
    private = serialization.load_der_private_key(plain, password=None)
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public == out["PublicKey"]


# --------------------------------------------------------------------------- asymmetric, MAC


def test_sign_then_verify_and_a_changed_message_is_an_invalid_signature(
    client: Any, signer: dict[str, Any]
) -> None:
    kwargs = {"KeyId": signer["KeyId"], "SigningAlgorithm": "ECDSA_SHA_256", "MessageType": "RAW"}
    sig = client.sign(Message=b"signed message", **kwargs)
    assert sig["KeyId"] == signer["Arn"] and sig["SigningAlgorithm"] == "ECDSA_SHA_256"
    ok = client.verify(Message=b"signed message", Signature=sig["Signature"], **kwargs)
    assert ok["SignatureValid"] is True
    with pytest.raises(ClientError) as err:
        client.verify(Message=b"signed messagE", Signature=sig["Signature"], **kwargs)
    assert error_code(err) == "KMSInvalidSignatureException"


def test_get_public_key_verifies_a_kms_signature_locally(
    client: Any, signer: dict[str, Any]
) -> None:
    pub = client.get_public_key(KeyId=signer["KeyId"])
    assert pub["KeySpec"] == "ECC_NIST_P256" and pub["KeyUsage"] == "SIGN_VERIFY"
    assert pub["SigningAlgorithms"] == ["ECDSA_SHA_256"]
    public = serialization.load_der_public_key(pub["PublicKey"])
    assert isinstance(public, ec.EllipticCurvePublicKey)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"digest signed")
    sig = client.sign(
        KeyId=signer["KeyId"],
        Message=digest.finalize(),
        MessageType="DIGEST",
        SigningAlgorithm="ECDSA_SHA_256",
    )["Signature"]
    public.verify(sig, b"digest signed", ec.ECDSA(hashes.SHA256()))  # raises if invalid


def test_encrypt_with_a_signing_key_is_invalid_key_usage(
    client: Any, signer: dict[str, Any]
) -> None:
    with pytest.raises(ClientError) as err:
        client.encrypt(KeyId=signer["KeyId"], Plaintext=b"x")
    assert error_code(err) == "InvalidKeyUsageException"


def test_generate_mac_then_verify_mac_and_a_changed_message_is_an_invalid_mac(
    client: Any, hmac_key: dict[str, Any]
) -> None:
    kwargs = {"KeyId": hmac_key["KeyId"], "MacAlgorithm": "HMAC_SHA_256"}
    mac = client.generate_mac(Message=b"mac me", **kwargs)
    assert len(mac["Mac"]) == 32 and mac["KeyId"] == hmac_key["Arn"]
    out = client.verify_mac(Message=b"mac me", Mac=mac["Mac"], **kwargs)
    assert out["MacValid"] is True
    with pytest.raises(ClientError) as err:
        client.verify_mac(Message=b"mac mE", Mac=mac["Mac"], **kwargs)
    assert error_code(err) == "KMSInvalidMacException"


def test_derive_shared_secret_equals_local_ecdh(client: Any, agreement: dict[str, Any]) -> None:
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = client.derive_shared_secret(
        KeyId=agreement["KeyId"], KeyAgreementAlgorithm="ECDH", PublicKey=peer_der
    )
    kms_public = serialization.load_der_public_key(
        client.get_public_key(KeyId=agreement["KeyId"])["PublicKey"]
    )
    assert isinstance(kms_public, ec.EllipticCurvePublicKey)
    assert out["SharedSecret"] == peer.exchange(ec.ECDH(), kms_public)
    assert out["KeyId"] == agreement["Arn"] and out["KeyAgreementAlgorithm"] == "ECDH"


# --------------------------------------------------------------------------- BYOK


def test_imported_key_material_encrypts_until_deleted(client: Any) -> None:
    key = new_key(client, Origin="EXTERNAL", Description="byok")
    assert key["KeyState"] == "PendingImport" and key["Origin"] == "EXTERNAL"
    params = client.get_parameters_for_import(
        KeyId=key["KeyId"], WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048"
    )
    assert isinstance(params["ParametersValidTo"], datetime)
    wrapping = serialization.load_der_public_key(params["PublicKey"])
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = wrapping.encrypt(os.urandom(32), oaep)  # type: ignore[union-attr]
    client.import_key_material(
        KeyId=key["KeyId"],
        ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrapped,
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )
    assert client.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
    blob = client.encrypt(KeyId=key["KeyId"], Plaintext=b"byok", EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    back = client.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)
    assert back["Plaintext"] == b"byok"

    client.delete_imported_key_material(KeyId=key["KeyId"])
    assert client.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "PendingImport"
    with pytest.raises(ClientError) as err:
        client.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)
    assert error_code(err) == "KMSInvalidStateException"


# --------------------------------------------------------------------------- aliases, tags


def test_aliases_create_list_update_delete(
    client: Any, sym: dict[str, Any], other: dict[str, Any]
) -> None:
    client.create_alias(AliasName="alias/boto3-moving", TargetKeyId=sym["KeyId"])
    listed = client.list_aliases(KeyId=sym["KeyId"])["Aliases"]
    names = {a["AliasName"]: a for a in listed}
    assert names["alias/boto3-moving"]["TargetKeyId"] == sym["KeyId"]
    assert names["alias/boto3-moving"]["AliasArn"] == (
        f"arn:aws:kms:us-east-1:{ACCOUNT}:alias/boto3-moving"
    )
    client.update_alias(AliasName="alias/boto3-moving", TargetKeyId=other["KeyId"])
    md = client.describe_key(KeyId="alias/boto3-moving")["KeyMetadata"]
    assert md["KeyId"] == other["KeyId"]
    everything = {a["AliasName"] for a in client.list_aliases()["Aliases"]}
    assert "alias/boto3-moving" in everything
    client.delete_alias(AliasName="alias/boto3-moving")
    with pytest.raises(ClientError) as err:
        client.describe_key(KeyId="alias/boto3-moving")
    assert error_code(err) == "NotFoundException"


def test_create_alias_twice_is_already_exists(
    client: Any, sym: dict[str, Any], sym_alias: str
) -> None:
    with pytest.raises(ClientError) as err:
        client.create_alias(AliasName=sym_alias, TargetKeyId=sym["KeyId"])
    assert error_code(err) == "AlreadyExistsException"


def test_tags_from_create_tag_resource_and_untag_resource(client: Any, sym: dict[str, Any]) -> None:
    client.tag_resource(KeyId=sym["KeyId"], Tags=[{"TagKey": "env", "TagValue": "test"}])
    tags = client.list_resource_tags(KeyId=sym["KeyId"])["Tags"]
    assert {t["TagKey"]: t["TagValue"] for t in tags} == {"team": "a", "env": "test"}
    client.untag_resource(KeyId=sym["KeyId"], TagKeys=["env"])
    tags = client.list_resource_tags(KeyId=sym["KeyId"])["Tags"]
    assert tags == [{"TagKey": "team", "TagValue": "a"}]


# --------------------------------------------------------------------------- listing


def test_list_keys_pages_with_limit_and_marker(
    client: Any, sym: dict[str, Any], other: dict[str, Any], signer: dict[str, Any]
) -> None:
    seen: list[str] = []
    marker: str | None = None
    pages = 0
    while True:
        page = client.list_keys(Limit=1, **({"Marker": marker} if marker else {}))
        pages += 1
        assert len(page["Keys"]) <= 1
        seen += [k["KeyArn"] for k in page["Keys"]]
        if not page["Truncated"]:
            assert "NextMarker" not in page
            break
        marker = page["NextMarker"]
    assert pages >= 3 and len(seen) == len(set(seen))
    assert {sym["Arn"], other["Arn"], signer["Arn"]} <= set(seen)
    everything = client.list_keys()["Keys"]
    assert {k["KeyArn"] for k in everything} == set(seen)
    assert all(k["KeyArn"].endswith(k["KeyId"]) for k in everything)


# --------------------------------------------------------------------------- grants


def test_grants_create_list_retire_and_revoke(
    client: Any, sym: dict[str, Any], admin: dict[str, Any]
) -> None:
    grantee = f"arn:aws:iam::{ACCOUNT}:user/boto3-grantee"
    retiring = f"arn:aws:iam::{ACCOUNT}:user/boto3-retirer"
    made = [
        client.create_grant(
            KeyId=sym["KeyId"],
            GranteePrincipal=grantee,
            RetiringPrincipal=retiring,
            Operations=["Encrypt", "Decrypt"],
            Constraints={"EncryptionContextSubset": {"tenant": "t1"}},
            Name=f"boto3-grant-{i}",
        )
        for i in range(3)
    ]
    ids = [g["GrantId"] for g in made]
    assert len(set(ids)) == 3 and all(g["GrantToken"] for g in made)
    listed = client.list_grants(KeyId=sym["KeyId"])["Grants"]
    by_id = {g["GrantId"]: g for g in listed}
    assert set(ids) <= set(by_id)
    first = by_id[ids[0]]
    assert first["GranteePrincipal"] == grantee and first["RetiringPrincipal"] == retiring
    assert sorted(first["Operations"]) == ["Decrypt", "Encrypt"]
    assert first["Constraints"] == {"EncryptionContextSubset": {"tenant": "t1"}}
    assert isinstance(first["CreationDate"], datetime) and first["Name"] == "boto3-grant-0"
    one = client.list_grants(KeyId=sym["KeyId"], GrantId=ids[1])["Grants"]
    assert [g["GrantId"] for g in one] == [ids[1]]

    retirable = client.list_retirable_grants(RetiringPrincipal=retiring)["Grants"]
    assert set(ids) <= {g["GrantId"] for g in retirable}
    assert all(g["KeyId"] == sym["Arn"] for g in retirable if g["GrantId"] in ids)

    client.retire_grant(GrantToken=made[0]["GrantToken"])
    client.retire_grant(KeyId=sym["Arn"], GrantId=ids[1])
    client.revoke_grant(KeyId=sym["KeyId"], GrantId=ids[2])
    left = {g["GrantId"] for g in client.list_grants(KeyId=sym["KeyId"])["Grants"]}
    assert not set(ids) & left
    with pytest.raises(ClientError) as err:
        client.revoke_grant(KeyId=sym["KeyId"], GrantId=ids[2])
    assert error_code(err) in ("NotFoundException", "InvalidGrantIdException")


# --------------------------------------------------------------------------- rotation


def test_rotation_on_demand_and_automatic_rotation_settings(client: Any) -> None:
    key = new_key(client, Description="rotation")
    old_blob = client.encrypt(KeyId=key["KeyId"], Plaintext=b"before")["CiphertextBlob"]
    client.enable_key_rotation(KeyId=key["KeyId"], RotationPeriodInDays=90)
    status = client.get_key_rotation_status(KeyId=key["KeyId"])
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 90
    assert isinstance(status["NextRotationDate"], datetime)
    client.disable_key_rotation(KeyId=key["KeyId"])
    assert client.get_key_rotation_status(KeyId=key["KeyId"])["KeyRotationEnabled"] is False

    assert client.list_key_rotations(KeyId=key["KeyId"])["Rotations"] == []
    assert client.rotate_key_on_demand(KeyId=key["KeyId"])["KeyId"] == key["Arn"]
    rotations = client.list_key_rotations(KeyId=key["KeyId"])["Rotations"]
    assert len(rotations) == 1 and rotations[0]["RotationType"] == "ON_DEMAND"
    assert isinstance(rotations[0]["RotationDate"], datetime)
    old = client.decrypt(CiphertextBlob=old_blob)
    assert old["Plaintext"] == b"before" and old["KeyMaterialId"] == key["CurrentKeyMaterialId"]
    fresh = client.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256")
    current = client.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["CurrentKeyMaterialId"]
    assert fresh["KeyMaterialId"] == rotations[0]["KeyMaterialId"] == current
    assert current != key["CurrentKeyMaterialId"]
    again = client.decrypt(CiphertextBlob=fresh["CiphertextBlob"])
    assert again["KeyMaterialId"] == current


def test_enable_key_rotation_out_of_range_is_a_validation_error(
    client: Any, sym: dict[str, Any]
) -> None:
    with pytest.raises(ClientError) as err:
        client.enable_key_rotation(KeyId=sym["KeyId"], RotationPeriodInDays=5000)
    assert error_code(err) == "ValidationException"


# --------------------------------------------------------------------------- lifecycle


def test_disable_then_enable_key(client: Any) -> None:
    key = new_key(client, Description="toggle")
    client.disable_key(KeyId=key["KeyId"])
    with pytest.raises(ClientError) as err:
        client.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert error_code(err) == "DisabledException"
    client.enable_key(KeyId=key["KeyId"])
    assert client.encrypt(KeyId=key["KeyId"], Plaintext=b"x")["KeyId"] == key["Arn"]


def test_schedule_and_cancel_key_deletion(client: Any) -> None:
    key = new_key(client, Description="doomed")
    out = client.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    assert out["KeyState"] == "PendingDeletion" and out["PendingWindowInDays"] == 7
    assert isinstance(out["DeletionDate"], datetime)
    md = client.describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert md["KeyState"] == "PendingDeletion" and md["DeletionDate"] == out["DeletionDate"]
    with pytest.raises(ClientError) as err:
        client.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert error_code(err) == "KMSInvalidStateException"
    assert client.cancel_key_deletion(KeyId=key["KeyId"])["KeyId"] == key["Arn"]
    md = client.describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert md["KeyState"] == "Disabled" and "DeletionDate" not in md


def test_schedule_key_deletion_window_out_of_range_is_a_validation_error(
    client: Any, other: dict[str, Any]
) -> None:
    with pytest.raises(ClientError) as err:
        client.schedule_key_deletion(KeyId=other["KeyId"], PendingWindowInDays=31)
    assert error_code(err) == "ValidationException"
    assert "pendingWindowInDays" in err.value.response["Error"]["Message"]


# --------------------------------------------------------------------------- policies


def test_key_policy_get_put_and_list(client: Any, other: dict[str, Any]) -> None:
    assert client.list_key_policies(KeyId=other["KeyId"])["PolicyNames"] == ["default"]
    default = json.loads(client.get_key_policy(KeyId=other["KeyId"])["Policy"])
    assert default["Statement"]
    policy = {
        "Version": "2012-10-17",
        "Id": "boto3-test",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    client.put_key_policy(KeyId=other["KeyId"], PolicyName="default", Policy=json.dumps(policy))
    got = client.get_key_policy(KeyId=other["KeyId"], PolicyName="default")
    assert json.loads(got["Policy"]) == policy and got["PolicyName"] == "default"


def test_put_key_policy_that_is_not_json_is_malformed(client: Any, other: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as err:
        client.put_key_policy(KeyId=other["KeyId"], PolicyName="default", Policy="{not json")
    assert error_code(err) == "MalformedPolicyDocumentException"


# --------------------------------------------------------------------------- signing


def test_identical_requests_within_one_second_are_both_answered(
    api_server: Server, admin: dict[str, Any], sym: dict[str, Any]
) -> None:
    """Two calls signed in the same second carry one signature; both are answered
    (the replay cache tells them apart by their per-call SDK headers), as AWS does."""
    plain = api_server.client(admin)
    dates: list[str] = []
    plain.meta.events.register(
        "before-send.kms", lambda request, **_: dates.append(request.headers["X-Amz-Date"])
    )
    for _ in range(5):  # until both are signed within one second (same signature)
        dates.clear()
        first = plain.describe_key(KeyId=sym["KeyId"])
        second = plain.describe_key(KeyId=sym["KeyId"])
        if dates[0] == dates[1]:
            break
    else:
        pytest.fail("could not sign two requests within one second")
    assert first["KeyMetadata"] == second["KeyMetadata"]


# --------------------------------------------------------------------------- coverage


def test_every_implemented_operation_was_exercised_with_success() -> None:
    """Runs last: an implemented operation that no test above called fails here."""
    expected = implemented_operations() | implemented_operations(KmsBackend)
    assert sorted(expected - CALLED) == [], f"pid {os.getpid()} called {sorted(CALLED)}"
    assert sorted(CALLED - expected) == []
