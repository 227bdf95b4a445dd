"""Authorization through the HTTP API with boto3: identity policies, cross-account
access, aws:SourceIp conditions and disabled principals, as AWS KMS answers them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.api.conftest import Server

A = "111122223333"
B = "444455556666"


def error_of(call: Any, **kwargs: Any) -> tuple[str, str, int]:
    """(code, message, HTTP status) of a call that must fail."""
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    err = info.value.response["Error"]
    return err["Code"], err["Message"], info.value.response["ResponseMetadata"]["HTTPStatusCode"]


def allow_all(**condition: Any) -> dict[str, Any]:
    statement: dict[str, Any] = {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}
    if condition:
        statement["Condition"] = condition
    return {"Version": "2012-10-17", "Statement": [statement]}


def test_a_user_without_identity_policy_is_denied_until_one_is_attached(
    api_server: Server, kms: Any
) -> None:
    key = kms.create_key(Description="authz")["KeyMetadata"]
    creds = api_server.principal("nopolicy")
    client = api_server.client(creds)
    code, message, status = error_of(client.encrypt, KeyId=key["KeyId"], Plaintext=b"x")
    assert (code, status) == ("AccessDeniedException", 400)
    assert message == (
        f"User: arn:aws:iam::{A}:user/nopolicy is not authorized to perform: kms:Encrypt "
        f"on resource: {key['Arn']} because no identity-based policy allows the kms:Encrypt "
        "action"
    )
    api_server.principal("nopolicy", policy=allow_all())
    out = client.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert out["KeyId"] == key["Arn"]


def test_another_account_sees_the_key_only_by_arn_and_needs_both_policies(
    api_server: Server, kms: Any
) -> None:
    key = kms.create_key(Description="shared")["KeyMetadata"]
    creds = api_server.principal("erin", account=B)
    other = api_server.client(creds)
    code, _, status = error_of(other.encrypt, KeyId=key["KeyId"], Plaintext=b"x")
    assert (code, status) == ("NotFoundException", 400)
    code, _, _ = error_of(other.encrypt, KeyId=key["Arn"], Plaintext=b"x")
    assert code == "AccessDeniedException"  # the key policy does not name account B

    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{A}:root"},
             "Action": "kms:*", "Resource": "*"},
            {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{B}:root"},
             "Action": ["kms:Encrypt", "kms:DescribeKey"], "Resource": "*"},
        ],
    }  # fmt: skip
    kms.put_key_policy(KeyId=key["KeyId"], PolicyName="default", Policy=json.dumps(policy))
    code, message, _ = error_of(other.encrypt, KeyId=key["Arn"], Plaintext=b"x")
    assert code == "AccessDeniedException"  # the key policy alone is not enough
    assert "no identity-based policy allows the kms:Encrypt action" in message

    api_server.principal("erin", account=B, policy=allow_all())
    assert other.encrypt(KeyId=key["Arn"], Plaintext=b"x")["KeyId"] == key["Arn"]
    assert other.describe_key(KeyId=key["Arn"])["KeyMetadata"]["KeyId"] == key["KeyId"]
    code, _, _ = error_of(other.encrypt, KeyId=key["KeyId"], Plaintext=b"x")
    assert code == "NotFoundException"  # still not visible by its bare id


@pytest.mark.parametrize(
    ("name", "cidr", "allowed"),
    [("from-loopback", "127.0.0.0/8", True), ("from-ten", "10.0.0.0/8", False)],
)
def test_a_source_ip_condition_sees_the_client_address(
    api_server: Server, kms: Any, name: str, cidr: str, allowed: bool
) -> None:
    key = kms.create_key(Description="ip")["KeyMetadata"]
    creds = api_server.principal(name, policy=allow_all(IpAddress={"aws:SourceIp": cidr}))
    client = api_server.client(creds)
    if allowed:
        assert client.encrypt(KeyId=key["KeyId"], Plaintext=b"x")["KeyId"] == key["Arn"]
        return
    code, message, _ = error_of(client.encrypt, KeyId=key["KeyId"], Plaintext=b"x")
    assert code == "AccessDeniedException"
    assert message.startswith(f"User: arn:aws:iam::{A}:user/{name} is not authorized")


def test_a_disabled_principal_is_not_recognised(api_server: Server, kms: Any) -> None:
    key = kms.create_key(Description="disabled")["KeyMetadata"]
    creds = api_server.principal("dora", policy=allow_all())
    client = api_server.client(creds)
    assert client.encrypt(KeyId=key["KeyId"], Plaintext=b"x")["KeyId"] == key["Arn"]
    api_server.cli("principals", "disable", "dora")
    code, message, _ = error_of(client.encrypt, KeyId=key["KeyId"], Plaintext=b"x")
    assert code == "UnrecognizedClientException"
    assert message == "The security token included in the request is invalid."
