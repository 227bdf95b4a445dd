"""The CloudTrail view of stored events, checked against AWS's published examples."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumers.cloudtrail import cloudtrail_record, event_id, event_time
from tests.fakes_relay import (
    ACCOUNT,
    MATERIAL_ID,
    PRINCIPAL,
    REGION,
    WRAPPED_B64,
    WRAPPED_MARKER,
    InMemoryLedger,
    call_failed,
    crypto_used,
    key_arn,
    key_created,
    key_deleted_by_service,
    key_disabled,
    mixed_events,
)

# Copies of shared/reference/cloudtrail (AWS KMS developer guide examples).
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "cloudtrail"
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
LEDGER_ID = "ledger-test"
# Fields AWS adds that KeyLedger has no source for (no TLS termination details).
AWS_ONLY = {"tlsDetails"}


def _reference(name: str) -> dict[str, Any]:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference record {path} not present")
    value: dict[str, Any] = json.loads(path.read_text())
    return value


def _view(event: dict[str, Any], seq: int = 1) -> dict[str, Any]:
    ledger = InMemoryLedger()
    for _ in range(seq - 1):
        ledger.append(crypto_used(KEY_ID))
    record = ledger.append(event)
    return cloudtrail_record(
        record.event(),
        seq=record.seq,
        record_hash=record.record_hash,
        prev=record.prev,
        ledger_id=LEDGER_ID,
    )


def test_encrypt_record_has_the_top_level_fields_of_the_aws_example() -> None:
    reference = _reference("encrypt-1.11.json")
    record = _view(crypto_used(KEY_ID, "Encrypt"))["record"]
    assert set(record) == set(reference) - AWS_ONLY
    assert set(record["userIdentity"]) == set(reference["userIdentity"]) - {"accessKeyId"}
    assert set(record["resources"][0]) == {"accountId", "type", "ARN"}
    assert record["eventVersion"] == reference["eventVersion"] == "1.11"


def test_createkey_record_has_the_top_level_fields_of_the_aws_example() -> None:
    reference = _reference("createkey-1.08.json")
    record = _view(key_created(KEY_ID))["record"]
    assert set(record) == set(reference)
    assert set(record["resources"][0]) == set(reference["resources"][0])
    assert record["responseElements"]["keyMetadata"]["keyId"] == KEY_ID


def test_api_call_fields_come_from_the_call_and_request() -> None:
    event = crypto_used(KEY_ID, "Decrypt", key_ref="alias/payments")
    record = _view(event)["record"]
    assert record["eventName"] == "Decrypt"
    assert record["eventSource"] == "kms.amazonaws.com"
    assert record["eventType"] == "AwsApiCall"
    assert record["awsRegion"] == REGION
    assert record["sourceIPAddress"] == "127.0.0.1"
    assert record["userAgent"] == "keyledger-cli/0.1.0"
    assert record["requestID"] == event["call"]["request_id"]
    assert record["readOnly"] is True
    assert record["managementEvent"] is True
    assert record["eventCategory"] == "Management"
    assert record["recipientAccountId"] == ACCOUNT
    assert record["userIdentity"] == {
        "type": "IAMUser",
        "principalId": PRINCIPAL,
        "arn": PRINCIPAL,
        "accountId": ACCOUNT,
        "userName": "alice",
    }
    # keyId is what the caller sent; the resource is the resolved key.
    assert record["requestParameters"]["keyId"] == "alias/payments"
    assert record["resources"] == [
        {"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": key_arn(KEY_ID)}
    ]
    assert record["additionalEventData"] == {"keyMaterialId": MATERIAL_ID}
    assert "errorCode" not in record
    assert "errorMessage" not in record


def test_event_time_is_rfc3339_utc_with_whole_seconds() -> None:
    assert event_time("2026-11-25T01:55:00.923456+00:00") == "2026-11-25T01:55:00Z"
    assert event_time("2026-11-25T03:55:07.5+02:00") == "2026-11-25T01:55:07Z"
    with pytest.raises(ValueError):
        event_time("2026-11-25T01:55:00")


def test_service_initiated_event_is_an_aws_service_event_invoked_by_kms() -> None:
    record = _view(key_deleted_by_service(KEY_ID))["record"]
    assert record["eventType"] == "AwsServiceEvent"
    assert record["userIdentity"] == {"accountId": ACCOUNT, "invokedBy": "AWS Internal"}
    assert record["sourceIPAddress"] == record["userAgent"] == "AWS Internal"
    assert record["eventName"] == "DeleteKey"
    assert record["requestParameters"] is None
    assert record["resources"][0]["ARN"] == key_arn(KEY_ID)
    assert "requestID" not in record
    reference = _reference("deletekey-1.08.json")
    assert set(record) == set(reference)


def test_failed_call_carries_error_code_and_message() -> None:
    record = _view(call_failed(KEY_ID, error_code="DisabledException"))["record"]
    assert record["errorCode"] == "DisabledException"
    assert record["errorMessage"] == "The key is disabled."
    assert record["responseElements"] is None
    assert "additionalEventData" not in record


def test_failed_call_on_an_unknown_key_has_no_resources() -> None:
    record = _view(call_failed(None, error_code="NotFoundException"))["record"]
    assert "resources" not in record
    assert record["recipientAccountId"] == ACCOUNT
    assert record["requestParameters"]["keyId"] == "alias/unknown"
    assert record["errorCode"] == "NotFoundException"


def test_envelope_maps_the_record_back_to_its_chain_position() -> None:
    ledger = InMemoryLedger()
    ledger.extend(mixed_events(3))
    record = ledger.record(3)
    value = cloudtrail_record(
        record.event(),
        seq=3,
        record_hash=record.record_hash,
        prev=record.prev,
        ledger_id=LEDGER_ID,
    )
    assert set(value) == {"ledger", "seq", "recordHash", "prev", "record"}
    assert value["ledger"] == LEDGER_ID
    assert value["seq"] == 3
    assert value["recordHash"] == record.record_hash.hex()
    assert value["prev"] == ledger.record(2).record_hash.hex()


def test_wrapped_material_and_replay_fields_never_appear_in_the_view() -> None:
    event = key_created(KEY_ID)
    assert event["material"]["wrapped"] == WRAPPED_B64
    published = orjson.dumps(_view(event))
    assert WRAPPED_B64.encode() not in published
    assert WRAPPED_MARKER not in published
    for field in (b'"material"', b'"wrapped"', b'"material_id"', b'"backing_version"'):
        assert field not in published
    # Nor do the store's own bookkeeping fields.
    for field in (b"originator_id", b"originator_version", b"ledger.domain.model"):
        assert field not in published


def test_the_view_reads_nothing_outside_its_allowed_fields() -> None:
    event = crypto_used(KEY_ID)
    event["secret_extra"] = {"plaintext": "c2VjcmV0"}
    event["call"] = {**event["call"]}
    published = orjson.dumps(_view(event))
    assert b"secret_extra" not in published
    assert b"c2VjcmV0" not in published


def test_event_id_is_a_stable_uuid_per_ledger_and_seq() -> None:
    first = _view(crypto_used(KEY_ID), seq=2)["record"]["eventID"]
    again = _view(crypto_used(KEY_ID), seq=2)["record"]["eventID"]
    assert first == again == event_id(LEDGER_ID, 2)
    assert uuid.UUID(first).version == 5
    assert event_id(LEDGER_ID, 3) != first
    assert event_id("another-ledger", 2) != first


def test_automatic_rotation_matches_aws_rotatekey_service_event() -> None:
    event = key_deleted_by_service(KEY_ID)
    event["call"] = {**event["call"], "operation": "RotateKey", "request_id": "r-1"}
    event["topic"] = "ledger.domain.model:Key.Rotated"
    event["request"] = {"keyId": KEY_ID}
    event["additional"] = {
        "rotationType": "AUTOMATIC",
        "keyOrigin": "AWS_KMS",
        "previousKeyMaterialId": "a" * 64,
        "currentKeyMaterialId": "b" * 64,
    }
    record = _view(event)["record"]
    reference = _reference("rotatekey-1.11.json")
    assert set(record) - {"eventCategory"} == set(reference)
    assert record["serviceEventDetails"] == event["additional"]
    assert record["requestParameters"] is None and "requestID" not in record
    assert "additionalEventData" not in record
    assert set(record["serviceEventDetails"]) == set(reference["serviceEventDetails"])


# ------------------------------------------------------------ per-operation shaping
# Stored events are immutable: these shapes are made by the view, so events stored
# before the shaping existed render exactly like new ones.


def _key_event(operation: str, **fields: Any) -> dict[str, Any]:
    event = key_disabled(KEY_ID)
    event["call"] = {**event["call"], "operation": operation}
    event.update(fields)
    return event


def test_create_grant_response_names_the_grant_and_key_and_never_the_token() -> None:
    event = _key_event(
        "CreateGrant",
        request={"keyId": KEY_ID, "granteePrincipal": PRINCIPAL, "operations": ["Decrypt"]},
        response={"grantId": "g" * 64, "grantToken": "c2VjcmV0LXRva2Vu"},
    )
    record = _view(event)["record"]
    assert record["responseElements"] == {"grantId": "g" * 64, "keyId": key_arn(KEY_ID)}
    assert b"c2VjcmV0LXRva2Vu" not in orjson.dumps(record)


def test_schedule_key_deletion_response_has_only_the_members_aws_logs() -> None:
    event = _key_event(
        "ScheduleKeyDeletion",
        request={"keyId": KEY_ID, "pendingWindowInDays": 20},
        response={
            "keyId": key_arn(KEY_ID),
            "deletionDate": "Apr 12, 2021, 6:58:30 PM",
            "keyState": "PendingDeletion",
            "pendingWindowInDays": 20,
        },
    )
    record = _view(event)["record"]
    reference = _reference("schedulekeydeletion-1.08.json")
    assert set(record["responseElements"]) == set(reference["responseElements"])
    assert record["requestParameters"] == {"keyId": KEY_ID, "pendingWindowInDays": 20}


def test_create_key_logs_the_deprecated_key_spec_twin_and_camel_case_tags() -> None:
    event = key_created(KEY_ID)
    event["request"] = {**event["request"], "tags": [{"TagKey": "team", "TagValue": "pay"}]}
    params = _view(event)["record"]["requestParameters"]
    assert params["customerMasterKeySpec"] == params["keySpec"] == "SYMMETRIC_DEFAULT"
    assert params["tags"] == [{"tagKey": "team", "tagValue": "pay"}]
    reference = _reference("createkey-1.08.json")
    assert set(params) - {"tags"} == set(reference["requestParameters"])


def test_create_alias_lists_the_key_and_the_alias_as_resources() -> None:
    event = _key_event(
        "CreateAlias", request={"aliasName": "alias/ExampleAlias", "targetKeyId": KEY_ID}
    )
    resources = _view(event)["record"]["resources"]
    alias = f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/ExampleAlias"
    assert [r["ARN"] for r in resources] == [key_arn(KEY_ID), alias]
    assert {r["type"] for r in resources} == {"AWS::KMS::Key"}


def test_reencrypt_lists_the_source_key_first_and_both_material_ids() -> None:
    source = "0987dcba-09fe-87dc-65ba-ab0987654321"
    event = crypto_used(KEY_ID, "ReEncrypt")
    event["additional"] = {
        "sourceKeyArn": key_arn(source),
        "sourceKeyMaterialId": "a" * 64,
        "keyMaterialId": "b" * 64,
    }
    record = _view(event)["record"]
    assert [r["ARN"] for r in record["resources"]] == [key_arn(source), key_arn(KEY_ID)]
    assert record["additionalEventData"] == {
        "sourceKeyMaterialId": "a" * 64,
        "destinationKeyMaterialId": "b" * 64,
    }


def test_generate_random_logs_no_bytes_and_an_empty_resource_list() -> None:
    event = crypto_used(KEY_ID, "GenerateRandom")
    event.update(key_arn=None, request={"numberOfBytes": 32}, additional=None)
    record = _view(event)["record"]
    assert record["requestParameters"] == {"numberOfBytes": 32}
    assert record["responseElements"] is None and record["resources"] == []
    event["request"] = {}  # nothing sent: null, as AWS's GenerateRandom example
    assert _view(event)["record"]["requestParameters"] is None


def test_import_key_material_logs_the_key_and_new_material_in_the_response() -> None:
    event = _key_event(
        "ImportKeyMaterial",
        request={"keyId": KEY_ID, "expirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"},
        additional={"keyMaterialId": MATERIAL_ID},
    )
    record = _view(event)["record"]
    assert record["responseElements"] == {"keyId": key_arn(KEY_ID), "keyMaterialId": MATERIAL_ID}
    assert "additionalEventData" not in record


def test_sign_and_mac_records_carry_no_additional_event_data() -> None:
    for operation in ("Sign", "Verify", "GenerateMac", "VerifyMac", "DeriveSharedSecret"):
        record = _view(crypto_used(KEY_ID, operation))["record"]
        assert "additionalEventData" not in record, operation


def test_delete_key_service_event_has_no_service_event_details() -> None:
    event = key_deleted_by_service(KEY_ID)
    event["additional"] = {"keyMaterialIds": [MATERIAL_ID]}
    record = _view(event)["record"]
    assert "serviceEventDetails" not in record
    assert MATERIAL_ID.encode() not in orjson.dumps(record)


def test_expired_material_is_a_service_event_naming_key_and_material() -> None:
    event = key_deleted_by_service(KEY_ID)
    event["call"] = {**event["call"], "operation": "DeleteExpiredKeyMaterial"}
    event.update(request={"keyId": KEY_ID}, additional={"keyMaterialId": MATERIAL_ID})
    record = _view(event)["record"]
    assert record["eventType"] == "AwsServiceEvent"
    assert record["requestParameters"] is None and record["responseElements"] is None
    assert record["serviceEventDetails"] == {"keyId": KEY_ID, "keyMaterialId": MATERIAL_ID}


def test_members_aws_never_logs_are_dropped_even_from_a_stored_event() -> None:
    event = crypto_used(KEY_ID, "Decrypt")
    event["request"] = {**event["request"], "ciphertextBlob": "QkxPQg==", "grantTokens": ["t"]}
    event["additional"] = {"keyMaterialId": MATERIAL_ID, "plaintext": "UFQ="}
    record = _view(event)["record"]
    assert set(record["requestParameters"]) == {"keyId", "encryptionContext", "encryptionAlgorithm"}
    assert record["additionalEventData"] == {"keyMaterialId": MATERIAL_ID}
    policy = _key_event("GetKeyPolicy", response={"policy": "{}", "policyName": "default"})
    assert _view(policy)["record"]["responseElements"] is None


def test_caller_context_keys_are_logged_as_sent_even_when_named_like_secrets() -> None:
    event = crypto_used(KEY_ID, "Encrypt")
    event["request"] = {**event["request"], "encryptionContext": {"plaintext": "no", "mac": "x"}}
    params = _view(event)["record"]["requestParameters"]
    assert params["encryptionContext"] == {"plaintext": "no", "mac": "x"}
