"""Successful reads (DescribeKey, Get*, List*) are on the record, as CloudTrail logs
them: one read-only call per request, with what the caller sent, null responseElements,
the key as the resource, and the request id the SDK got back. A refused or failed read
is one failure record under that same id."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from consumers.cloudtrail import cloudtrail_view
from tests.api.conftest import LedgerView, Server

pytestmark = pytest.mark.softhsm

ACCOUNT = "111122223333"


@pytest.fixture(scope="module")
def keys(kms: Any) -> dict[str, str]:
    sym = kms.create_key(Description="reads")["KeyMetadata"]["Arn"]
    signer = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    kms.create_alias(AliasName="alias/read-records", TargetKeyId=sym)
    return {"sym": sym, "signer": signer}


def _one_record(view: LedgerView, before: int, out: dict[str, Any]) -> dict[str, Any]:
    records = view.records_after(before)
    assert len(records) == 1, [(r["topic"], r["call"]["operation"]) for r in records]
    record = records[0]
    assert record["call"]["request_id"] == out["ResponseMetadata"]["RequestId"]
    return record


# (operation, boto3 call given the keys, requestParameters AWS logs, resource key or None)
READS: list[tuple[str, Callable[[Any, dict[str, str]], Any], Any, str | None]] = [
    ("DescribeKey", lambda c, k: c.describe_key(KeyId="alias/read-records"),
     {"keyId": "alias/read-records"}, "sym"),
    ("GetKeyPolicy", lambda c, k: c.get_key_policy(KeyId=k["sym"], PolicyName="default"),
     {"keyId": "sym", "policyName": "default"}, "sym"),
    ("GetKeyRotationStatus", lambda c, k: c.get_key_rotation_status(KeyId=k["sym"]),
     {"keyId": "sym"}, "sym"),
    ("GetPublicKey", lambda c, k: c.get_public_key(KeyId=k["signer"]),
     {"keyId": "signer"}, "signer"),
    ("GetKeyLastUsage", lambda c, k: c.get_key_last_usage(KeyId=k["sym"]),
     {"keyId": "sym"}, "sym"),
    ("ListKeyPolicies", lambda c, k: c.list_key_policies(KeyId=k["sym"], Limit=5),
     {"keyId": "sym", "limit": 5}, "sym"),
    ("ListKeyRotations", lambda c, k: c.list_key_rotations(KeyId=k["sym"]),
     {"keyId": "sym"}, "sym"),
    ("ListResourceTags", lambda c, k: c.list_resource_tags(KeyId=k["sym"]),
     {"keyId": "sym"}, "sym"),
    ("ListGrants", lambda c, k: c.list_grants(KeyId=k["sym"], Limit=3),
     {"keyId": "sym", "limit": 3}, "sym"),
    ("ListKeys", lambda c, k: c.list_keys(), None, None),
    ("ListKeys", lambda c, k: c.list_keys(Limit=2), {"limit": 2}, None),
    ("ListAliases", lambda c, k: c.list_aliases(), None, None),
    ("ListRetirableGrants",
     lambda c, k: c.list_retirable_grants(RetiringPrincipal=f"arn:aws:iam::{ACCOUNT}:root"),
     {"retiringPrincipal": f"arn:aws:iam::{ACCOUNT}:root"}, None),
]  # fmt: skip


@pytest.mark.parametrize(("operation", "call", "params", "resource"), READS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(READS)])  # fmt: skip
def test_a_successful_read_is_one_read_only_record(
    api_server: Server,
    kms: Any,
    keys: dict[str, str],
    operation: str,
    call: Callable[[Any, dict[str, str]], Any],
    params: Any,
    resource: str | None,
) -> None:
    view = LedgerView(api_server.data_dir)
    before = view.head()
    out = call(kms, keys)
    record = _one_record(view, before, out)
    assert record["topic"].endswith("ApiCall.Succeeded")
    assert record["call"]["operation"] == operation and record["read_only"] is True

    trail = cloudtrail_view(record, seq=before + 1, ledger_id="test")
    assert trail["eventName"] == operation and trail["readOnly"] is True
    assert trail["responseElements"] is None and "errorCode" not in trail
    expected = params
    if isinstance(params, dict) and params.get("keyId") in keys:
        expected = {**params, "keyId": keys[params["keyId"]]}
    assert trail["requestParameters"] == expected
    if resource is None:
        assert "resources" not in trail
    else:
        assert trail["resources"] == [
            {"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": keys[resource]}
        ]
    # What the read answered is not in the record (the policy, the public key).
    stored = json.dumps(record)
    for value in out.values():
        if isinstance(value, bytes) and value:
            assert value.hex() not in stored
    if operation == "GetKeyPolicy":
        assert '"Statement"' not in stored and "Statement" not in trail


def test_a_refused_listing_is_one_failure_under_the_answered_id(
    api_server: Server, keys: dict[str, str]
) -> None:
    view = LedgerView(api_server.data_dir)
    nobody = api_server.client(api_server.principal("read-records-nobody"))
    before = view.head()
    with pytest.raises(ClientError) as err:
        nobody.list_keys()
    assert err.value.response["Error"]["Code"] == "AccessDeniedException"
    record = _one_record(view, before, err.value.response)
    assert record["topic"].endswith("ApiCall.Failed")
    assert record["error_code"] == "AccessDeniedException" and record["read_only"] is True


def test_a_listing_that_fails_after_authorization_is_one_failure(
    api_server: Server, kms: Any
) -> None:
    """ListKeys with a bad marker passes kms:ListKeys, then the catalog refuses the
    marker: one record, under the id the SDK got (no success record before it)."""
    view = LedgerView(api_server.data_dir)
    before = view.head()
    with pytest.raises(ClientError) as err:
        kms.list_keys(Marker="not-a-marker")
    assert err.value.response["Error"]["Code"] == "InvalidMarkerException"
    record = _one_record(view, before, err.value.response)
    assert record["error_code"] == "InvalidMarkerException"
    assert record["request"] == {"marker": "not-a-marker"}


def test_list_aliases_of_an_unknown_key_is_not_found_and_one_failure(
    api_server: Server, kms: Any
) -> None:
    view = LedgerView(api_server.data_dir)
    before = view.head()
    with pytest.raises(ClientError) as err:
        kms.list_aliases(KeyId="00000000-0000-4000-8000-000000000000")
    assert err.value.response["Error"]["Code"] == "NotFoundException"
    assert err.value.response["Error"]["Message"] == (
        f"Key 'arn:aws:kms:us-east-1:{ACCOUNT}:key/00000000-0000-4000-8000-000000000000' "
        "does not exist"
    )
    record = _one_record(view, before, err.value.response)
    assert record["error_code"] == "NotFoundException"
    assert record["request"] == {"keyId": "00000000-0000-4000-8000-000000000000"}


def test_a_read_of_another_accounts_key_refused_is_recorded(
    api_server: Server, keys: dict[str, str]
) -> None:
    view = LedgerView(api_server.data_dir)
    outsider = api_server.principal("read-records-outsider", account="444455556666")
    client = api_server.client(outsider)
    before = view.head()
    with pytest.raises(ClientError) as err:
        client.describe_key(KeyId=keys["sym"])
    assert err.value.response["Error"]["Code"] == "AccessDeniedException"
    record = _one_record(view, before, err.value.response)
    assert record["error_code"] == "AccessDeniedException"
    assert record["key_arn"] == keys["sym"]
