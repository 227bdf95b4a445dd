"""The API answers boto3 with SigV4 against a stored principal (the base other API
tests build on)."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.api.conftest import Server


def test_encrypt_decrypt_round_trip_and_a_wrong_secret_refused(
    api_server: Server, kms: Any, admin: dict[str, Any]
) -> None:
    key = kms.create_key(Description="smoke")["KeyMetadata"]
    assert key["Arn"].startswith("arn:aws:kms:us-east-1:111122223333:key/")
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"hello", EncryptionContext={"a": "b"})
    out = kms.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"a": "b"})
    assert out["Plaintext"] == b"hello" and out["KeyId"] == key["Arn"]
    bad = api_server.client(admin, secret="x" * 40)
    with pytest.raises(ClientError) as err:
        bad.describe_key(KeyId=key["KeyId"])
    assert err.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
