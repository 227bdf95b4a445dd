"""The AWS Encryption SDK for Python (v4, key commitment required) over a real
``keyledger serve``: its KMS master key provider reaches the server through botocore's
service-specific endpoint setting ``AWS_ENDPOINT_URL_KMS`` (botocore >= 1.31), with no
change to the SDK. GenerateDataKey on encrypt, Decrypt on decrypt, both with the
message's encryption context."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aws_encryption_sdk
import botocore.session
import pytest
from aws_encryption_sdk import CommitmentPolicy, EncryptionSDKClient, StrictAwsKmsMasterKeyProvider
from aws_encryption_sdk.exceptions import DecryptKeyError

from tests.api.conftest import Server

pytestmark = pytest.mark.softhsm

MiB = 1024 * 1024
CONTEXT = {"purpose": "encryption-sdk", "tenant": "t-42"}


@pytest.fixture(scope="module")
def sdk_user(api_server: Server) -> dict[str, Any]:
    return api_server.principal(
        "encryption-sdk",
        policy={
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
        },
    )


@pytest.fixture(scope="module")
def keys(api_server: Server, sdk_user: dict[str, Any]) -> tuple[str, str]:
    """Two symmetric keys' ARNs: the one messages use, and an unrelated one."""
    kms = api_server.client(sdk_user)
    first = kms.create_key(Description="encryption sdk")["KeyMetadata"]["Arn"]
    second = kms.create_key(Description="encryption sdk, other")["KeyMetadata"]["Arn"]
    return first, second


@pytest.fixture
def kms_endpoint(api_server: Server, tmp_path: Path) -> Iterator[None]:
    """Point every botocore KMS client at the server through the environment only, with
    empty AWS config files so no user configuration leaks in."""
    (tmp_path / "empty").write_text("")
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(name)
        mp.setenv("AWS_ENDPOINT_URL_KMS", api_server.url)
        mp.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_MAX_ATTEMPTS", "1")
        yield


def provider(
    creds: dict[str, Any], key_arn: str, calls: list[tuple[str, str, str]] | None = None
) -> StrictAwsKmsMasterKeyProvider:
    """A strict provider for one key, signing as ``creds``; each KMS call it makes is
    appended to ``calls`` as (operation, URL, error code or "")."""
    session = botocore.session.Session()
    session.set_credentials(creds["AccessKeyId"], creds["SecretAccessKey"])
    if calls is not None:

        def record(http_response: Any, parsed: Any, model: Any, **_: Any) -> None:
            code = parsed.get("Error", {}).get("Code", "")
            calls.append((model.name, http_response.url, code))

        session.register("after-call.kms", record)
    return StrictAwsKmsMasterKeyProvider(key_ids=[key_arn], botocore_session=session)


def test_ten_mib_message_round_trips_with_its_encryption_context(
    api_server: Server,
    kms_endpoint: None,
    sdk_user: dict[str, Any],
    keys: tuple[str, str],
    record_property: Any,
) -> None:
    assert aws_encryption_sdk.__version__.startswith("4.")
    client = EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    message = os.urandom(10 * MiB)

    calls: list[tuple[str, str, str]] = []
    started = time.perf_counter()
    ciphertext, enc_header = client.encrypt(
        source=message, key_provider=provider(sdk_user, keys[0], calls), encryption_context=CONTEXT
    )
    encrypted = time.perf_counter()
    plaintext, dec_header = client.decrypt(
        source=ciphertext, key_provider=provider(sdk_user, keys[0], calls)
    )
    decrypted = time.perf_counter()
    record_property("encrypt_seconds", round(encrypted - started, 3))
    record_property("decrypt_seconds", round(decrypted - encrypted, 3))

    assert [(op, code) for op, _, code in calls] == [("GenerateDataKey", ""), ("Decrypt", "")]
    assert all(url.startswith(api_server.url) for _, url, _ in calls)
    assert plaintext == message
    assert len(ciphertext) > len(message)
    assert [k.key_provider.key_info.decode() for k in enc_header.encrypted_data_keys] == [keys[0]]
    assert all(k.key_provider.provider_id == "aws-kms" for k in enc_header.encrypted_data_keys)
    for header in (enc_header, dec_header):
        assert CONTEXT.items() <= header.encryption_context.items()
    assert dec_header.encryption_context == enc_header.encryption_context
    assert dec_header.message_id == enc_header.message_id


def test_decrypt_with_a_provider_for_another_key_fails(
    kms_endpoint: None, sdk_user: dict[str, Any], keys: tuple[str, str]
) -> None:
    client = EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    ciphertext, _ = client.encrypt(
        source=b"for the first key only",
        key_provider=provider(sdk_user, keys[0]),
        encryption_context=CONTEXT,
    )
    calls: list[tuple[str, str, str]] = []
    with pytest.raises(DecryptKeyError):
        client.decrypt(source=ciphertext, key_provider=provider(sdk_user, keys[1], calls))
    assert calls == []  # a strict provider only asks KMS for its own keys' data keys


def test_decrypt_refused_by_kms_fails_without_plaintext(
    api_server: Server, kms_endpoint: None, sdk_user: dict[str, Any], keys: tuple[str, str]
) -> None:
    """The server itself refuses: a principal without kms:Decrypt gets AccessDenied for
    the data key, which the SDK reports as no decryptable data key."""
    client = EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    ciphertext, _ = client.encrypt(
        source=b"not for everyone",
        key_provider=provider(sdk_user, keys[0]),
        encryption_context=CONTEXT,
    )
    reader = api_server.principal(
        "encryption-sdk-no-decrypt",
        policy={
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "kms:DescribeKey", "Resource": "*"}],
        },
    )
    calls: list[tuple[str, str, str]] = []
    with pytest.raises(DecryptKeyError):
        client.decrypt(source=ciphertext, key_provider=provider(reader, keys[0], calls))
    assert [(op, code) for op, _, code in calls] == [("Decrypt", "AccessDeniedException")]
