"""The OCSF and ECS views of published audit records.

The OCSF events are validated against the real OCSF schema: the schema exports of
schema.ocsf.io that the ``ocsf-json-schema`` package ships, turned into JSON Schema
(draft 2020-12) by that package, offline.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

from api.protocol import model_operations
from consumers.cloudtrail import cloudtrail_record
from consumers.views import OCSF_ACTIVITY, OCSF_VERSION, ecs_document, ocsf_event
from tests.fakes_relay import (
    ACCOUNT,
    BASE_TIME,
    PRINCIPAL,
    REGION,
    USER_AGENT,
    WRAPPED_B64,
    WRAPPED_MARKER,
    InMemoryLedger,
    call_failed,
    crypto_used,
    key_arn,
    key_created,
    key_deleted_by_service,
    key_disabled,
)

ROOT = Path(__file__).resolve().parents[2]
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
LEDGER_ID = "ledger-test"
# Oldest 1.x that Amazon Security Lake reads, the version we declare, newest packaged.
OCSF_VERSIONS = ("1.1.0", OCSF_VERSION, "1.8.0")
CAPTIONS = {0: "Unknown", 1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"}
# ECS reference, "ECS categorization field: event.category": expected event types.
ECS_EXPECTED_TYPES = {
    "api": {
        "access",
        "admin",
        "allowed",
        "change",
        "creation",
        "deletion",
        "denied",
        "end",
        "info",
        "start",
        "user",
    },
    "configuration": {"access", "change", "creation", "deletion", "info"},
    "iam": {"admin", "change", "creation", "deletion", "group", "info", "user"},
}


# ----------------------------------------------------------------- stored events


def _service_rotation(key_id: str) -> dict[str, Any]:
    event = key_deleted_by_service(key_id)
    event["call"] = {**event["call"], "operation": "RotateKey"}
    event["topic"] = "ledger.domain.model:Key.Rotated"
    event["additional"] = {
        "rotationType": "AUTOMATIC",
        "keyOrigin": "AWS_KMS",
        "previousKeyMaterialId": "a" * 64,
        "currentKeyMaterialId": "b" * 64,
    }
    return event


def _principal_event(operation: str, topic: str, request: dict[str, Any]) -> dict[str, Any]:
    target = f"arn:aws:iam::{ACCOUNT}:user/bob"
    return {
        "originator_id": str(uuid.uuid5(uuid.NAMESPACE_URL, target)),
        "originator_version": 1,
        "topic": f"ledger.domain.principals:{topic}",
        "timestamp": BASE_TIME.isoformat(),
        "call": {
            "operation": operation,
            "request_id": str(uuid.uuid4()),
            "principal": PRINCIPAL,
            "source_ip": "10.1.2.3",
            "user_agent": USER_AGENT,
            "region": REGION,
            "account_id": ACCOUNT,
            "service_initiated": False,
            "access_key_id": "AKLDEXAMPLEEXAMPLE12",
        },
        "request": request,
        "arn": target,
        "name": "bob",
        "account": ACCOUNT,
        "principal_type": "user",
        "access_key_id": "AKLDEXAMPLEEXAMPLE34",
    }


def _create_user() -> dict[str, Any]:
    request = {"principalName": "bob", "account": ACCOUNT, "principalType": "user"}
    return _principal_event("CreateUser", "Principal.Created", request)


def _put_principal_policy() -> dict[str, Any]:
    request = {
        "principalName": "bob",
        "account": ACCOUNT,
        "policyName": "p1",
        "policyDocument": '{"Version":"2012-10-17","Statement":[]}',
    }
    return _principal_event("PutPrincipalPolicy", "Principal.PolicyAttached", request)


def _anonymous_denied() -> dict[str, Any]:
    event = call_failed(
        None,
        "Encrypt",
        error_code="UnrecognizedClientException",
        error_message="The security token included in the request is invalid.",
    )
    event["call"] = {**event["call"], "principal": "anonymous"}
    return event


def _cli_call_without_source_ip() -> dict[str, Any]:
    event = key_disabled(KEY_ID)
    event["call"] = {**event["call"], "source_ip": None}
    return event


def _envelope(event: dict[str, Any], seq: int = 1) -> dict[str, Any]:
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


def _with_operation(envelope: dict[str, Any], operation: str) -> dict[str, Any]:
    changed = copy.deepcopy(envelope)
    changed["record"]["eventName"] = operation
    return changed


EVENTS: dict[str, Any] = {
    "CreateKey": lambda: key_created(KEY_ID),
    "Encrypt": lambda: crypto_used(KEY_ID, "Encrypt"),
    "Decrypt via alias": lambda: crypto_used(KEY_ID, "Decrypt", key_ref="alias/payments"),
    "GenerateDataKey": lambda: crypto_used(KEY_ID, "GenerateDataKey"),
    "Sign": lambda: crypto_used(KEY_ID, "Sign"),
    "DisableKey": lambda: key_disabled(KEY_ID),
    "Decrypt denied": lambda: call_failed(
        KEY_ID, error_code="AccessDeniedException", error_message="User is not authorized."
    ),
    "Decrypt of a disabled key": lambda: call_failed(KEY_ID),
    "Decrypt of an unknown key": lambda: call_failed(None, error_code="NotFoundException"),
    "DeleteKey by the service": lambda: key_deleted_by_service(KEY_ID),
    "RotateKey by the service": lambda: _service_rotation(KEY_ID),
    "CreateUser": _create_user,
    "PutPrincipalPolicy": _put_principal_policy,
    "anonymous caller": _anonymous_denied,
    "CLI call without source IP": _cli_call_without_source_ip,
}


@pytest.fixture(params=sorted(EVENTS))
def envelope(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _envelope(EVENTS[request.param](), seq=3)


# ---------------------------------------------------------------- OCSF schema


@functools.cache
def _validator(version: str) -> jsonschema.Draft202012Validator:
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version)).get_class_schema(
        "api_activity", ["cloud"]
    )
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _schema_errors(event: dict[str, Any], version: str = OCSF_VERSION) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in _validator(version).iter_errors(event)]


# -------------------------------------------------- the operations KeyLedger emits


def _string_constants(node: ast.AST) -> set[str]:
    return {
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def _operation_positions(trees: list[ast.Module]) -> dict[str, int]:
    """Function name -> index (after self/cls) of its ``operation`` parameter."""
    positions: dict[str, int] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names = [a.arg for a in [*node.args.posonlyargs, *node.args.args]]
                if names and names[0] in ("self", "cls"):
                    names = names[1:]
                if "operation" in names:
                    positions[node.name] = names.index("operation")
    return positions


def _emitted_operations() -> set[str]:
    """Every operation name KeyLedger can record, derived from the code, not copied.

    The API records any KMS operation of botocore's model (unimplemented ones as
    refused). Other names are the string literals the code passes as an ``operation``
    argument (positionally or by keyword) to any of its functions that take one, and
    the literals assigned to a variable that is passed that way (``label``, ``op``).
    """
    trees = [
        ast.parse(path.read_text(), filename=str(path))
        for package in ("ledger", "api", "cli")
        for path in sorted((ROOT / package).rglob("*.py"))
    ]
    positions = _operation_positions(trees)
    found: set[str] = set()
    for tree in trees:
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assigned: dict[str, list[ast.expr]] = {}
            for node in ast.walk(func):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            assigned.setdefault(target.id, []).append(node.value)
            for call in ast.walk(func):
                if not isinstance(call, ast.Call):
                    continue
                name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
                given = [k.value for k in call.keywords if k.arg == "operation"]
                index = positions.get(name or "")
                if index is not None and len(call.args) > index:
                    given.append(call.args[index])
                for expr in given:
                    found |= _string_constants(expr)
                    for ref in ast.walk(expr):
                        if isinstance(ref, ast.Name):
                            for value in assigned.get(ref.id, []):
                                found |= _string_constants(value)
    names = {s for s in found if re.fullmatch(r"[A-Z][A-Za-z]+", s)}
    return names | set(model_operations())


def test_every_operation_keyledger_records_has_an_explicit_activity() -> None:
    emitted = _emitted_operations()
    # The scan sees the service events, the IAM side and the API's own labels.
    assert {
        "RotateKey",
        "DeleteKey",
        "DeleteExpiredKeyMaterial",
        "CreateUser",
        "CreateRole",
        "CreateAccessKey",
        "PutPrincipalPolicy",
        "DisablePrincipal",
        "DeletePrincipal",
        "GetCallerIdentity",
        "Unknown",
    } <= emitted
    assert {"Encrypt", "GenerateDataKey", "Sign", "CreateKey"} <= emitted
    assert sorted(emitted - set(OCSF_ACTIVITY)) == []
    assert sorted(set(OCSF_ACTIVITY) - emitted) == []  # no stale entries either


def test_activity_table_uses_ocsf_ids_with_their_captions_or_the_operation_name() -> None:
    for operation, (activity_id, name) in OCSF_ACTIVITY.items():
        assert activity_id in CAPTIONS, operation
        assert name == (operation if activity_id == 99 else CAPTIONS[activity_id]), operation


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        ("Encrypt", (99, "Encrypt")),
        ("Decrypt", (99, "Decrypt")),
        ("ReEncrypt", (99, "ReEncrypt")),
        ("GenerateDataKey", (99, "GenerateDataKey")),
        ("GenerateDataKeyPairWithoutPlaintext", (99, "GenerateDataKeyPairWithoutPlaintext")),
        ("Sign", (99, "Sign")),
        ("VerifyMac", (99, "VerifyMac")),
        ("GenerateRandom", (99, "GenerateRandom")),
        ("CreateKey", (1, "Create")),
        ("CreateGrant", (1, "Create")),
        ("CreateAccessKey", (1, "Create")),
        ("DescribeKey", (2, "Read")),
        ("ListAliases", (2, "Read")),
        ("GetKeyPolicy", (2, "Read")),
        ("DisableKey", (3, "Update")),
        ("PutKeyPolicy", (3, "Update")),
        ("ScheduleKeyDeletion", (3, "Update")),
        ("RotateKey", (3, "Update")),
        ("DisablePrincipal", (3, "Update")),
        ("DeleteAlias", (4, "Delete")),
        ("RevokeGrant", (4, "Delete")),
        ("DeleteKey", (4, "Delete")),
        ("DeleteExpiredKeyMaterial", (4, "Delete")),
        ("Unknown", (0, "Unknown")),
    ],
)
def test_operations_map_to_their_ocsf_activity(operation: str, expected: tuple[int, str]) -> None:
    assert OCSF_ACTIVITY[operation] == expected
    event = ocsf_event(_with_operation(_envelope(crypto_used(KEY_ID)), operation))
    assert (event["activity_id"], event["activity_name"]) == expected
    assert event["type_uid"] == 6003 * 100 + expected[0]
    assert event["type_name"] == f"API Activity: {CAPTIONS[expected[0]]}"


def test_an_operation_missing_from_the_table_maps_to_other_with_its_name() -> None:
    assert "FrobnicateKey" not in OCSF_ACTIVITY
    event = ocsf_event(_with_operation(_envelope(crypto_used(KEY_ID)), "FrobnicateKey"))
    assert (event["activity_id"], event["activity_name"]) == (99, "FrobnicateKey")
    assert event["type_uid"] == 600399
    assert event["api"]["operation"] == "FrobnicateKey"
    assert _schema_errors(event) == []
    assert (
        ecs_document(_with_operation(_envelope(crypto_used(KEY_ID)), "FrobnicateKey"))["event"][
            "action"
        ]
        == "FrobnicateKey"
    )


# ------------------------------------------------------------------ OCSF mapping


def test_ocsf_event_maps_a_successful_encrypt() -> None:
    envelope = _envelope(crypto_used(KEY_ID, "Encrypt"), seq=5)
    record = envelope["record"]
    event = ocsf_event(envelope)

    assert (event["class_uid"], event["class_name"]) == (6003, "API Activity")
    assert (event["category_uid"], event["category_name"]) == (6, "Application Activity")
    assert (event["activity_id"], event["activity_name"], event["type_uid"]) == (
        99,
        "Encrypt",
        600399,
    )
    assert event["time"] == int(datetime(2026, 11, 25, 1, 55, tzinfo=UTC).timestamp()) * 1000
    assert (event["status_id"], event["status"]) == (1, "Success")
    assert (event["severity_id"], event["severity"]) == (1, "Informational")
    assert event["metadata"] == {
        "version": OCSF_VERSION,
        "product": {"name": "KeyLedger", "vendor_name": "KeyLedger"},
        "profiles": ["cloud"],
        "uid": record["eventID"],
        "sequence": 5,
        "log_name": LEDGER_ID,
        "log_provider": "KeyLedger",
        "log_version": "1.11",
    }
    assert event["api"] == {
        "operation": "Encrypt",
        "service": {"name": "kms.amazonaws.com"},
        "request": {"uid": record["requestID"], "data": record["requestParameters"]},
    }
    account = {"uid": ACCOUNT, "type_id": 10, "type": "AWS Account"}
    assert event["actor"] == {
        "user": {
            "uid": PRINCIPAL,
            "name": "alice",
            "type": "IAMUser",
            "type_id": 1,
            "account": account,
        }
    }
    assert event["src_endpoint"] == {"ip": "127.0.0.1"}
    assert event["http_request"] == {"user_agent": USER_AGENT}
    assert event["cloud"] == {"provider": "AWS", "region": REGION, "account": account}
    assert event["resources"] == [
        {"uid": key_arn(KEY_ID), "type": "AWS::KMS::Key", "owner": {"account": account}}
    ]
    assert {(o["type_id"], o["value"]) for o in event["observables"]} == {
        (2, "127.0.0.1"),
        (4, "alice"),
        (10, key_arn(KEY_ID)),
    }
    assert event["unmapped"]["keyledger"] == {
        "ledger": LEDGER_ID,
        "seq": 5,
        "recordHash": envelope["recordHash"],
        "prev": envelope["prev"],
    }
    unmapped = event["unmapped"]["cloudtrail"]
    assert unmapped.get("additionalEventData") == record.get("additionalEventData")
    assert unmapped["eventType"] == "AwsApiCall" and unmapped["readOnly"] is True
    assert "raw_data" not in event
    assert "status_code" not in event
    assert event["api"].get("response", {}).get("data") == record["responseElements"]


def test_ocsf_event_of_an_access_denied_call_is_a_medium_severity_failure() -> None:
    envelope = _envelope(EVENTS["Decrypt denied"]())
    event = ocsf_event(envelope)
    assert (event["status_id"], event["status"]) == (2, "Failure")
    assert (event["severity_id"], event["severity"]) == (3, "Medium")
    assert event["status_code"] == "AccessDeniedException"
    assert event["status_detail"] == "User is not authorized."
    assert event["api"]["response"] == {
        "error": "AccessDeniedException",
        "error_message": "User is not authorized.",
    }
    assert event["api"]["request"]["uid"] == envelope["record"]["requestID"]


@pytest.mark.parametrize(
    ("error_code", "severity_id"),
    [
        ("AccessDeniedException", 3),
        ("UnrecognizedClientException", 3),
        ("InvalidSignatureException", 3),
        ("DisabledException", 2),
        ("KMSInvalidStateException", 2),
        ("InvalidCiphertextException", 2),
        ("KMSInternalException", 2),
        ("DryRunOperationException", 1),
    ],
)
def test_failure_severity_is_medium_for_denials_low_otherwise(
    error_code: str, severity_id: int
) -> None:
    event = ocsf_event(_envelope(call_failed(KEY_ID, error_code=error_code)))
    assert event["status_id"] == 2
    assert event["severity_id"] == severity_id


def test_ocsf_service_event_has_no_request_and_is_invoked_by_aws() -> None:
    envelope = _envelope(_service_rotation(KEY_ID))
    event = ocsf_event(envelope)
    assert "requestID" not in envelope["record"]
    assert (event["activity_id"], event["activity_name"], event["type_uid"]) == (
        3,
        "Update",
        600303,
    )
    assert event["api"] == {"operation": "RotateKey", "service": {"name": "kms.amazonaws.com"}}
    assert event["actor"] == {
        "invoked_by": "AWS Internal",
        "user": {"account": {"uid": ACCOUNT, "type_id": 10, "type": "AWS Account"}},
    }
    assert event["src_endpoint"] == {"svc_name": "AWS Internal"}
    assert "http_request" not in event
    assert event["unmapped"]["cloudtrail"]["eventType"] == "AwsServiceEvent"
    assert event["unmapped"]["cloudtrail"]["serviceEventDetails"]["rotationType"] == "AUTOMATIC"
    assert event["resources"][0]["uid"] == key_arn(KEY_ID)


def test_ocsf_principal_event_is_an_iam_api_activity() -> None:
    envelope = _envelope(_create_user())
    event = ocsf_event(envelope)
    assert (event["activity_id"], event["activity_name"]) == (1, "Create")
    assert event["api"]["service"] == {"name": "iam.amazonaws.com"}
    assert event["api"]["request"]["data"]["principalName"] == "bob"
    assert event["actor"]["user"]["credential_uid"] == "AKLDEXAMPLEEXAMPLE12"
    assert event["src_endpoint"] == {"ip": "10.1.2.3"}
    assert "resources" not in event


def test_ocsf_event_without_a_source_address_names_the_local_endpoint() -> None:
    event = ocsf_event(_envelope(_cli_call_without_source_ip()))
    assert event["src_endpoint"] == {"name": "local"}


def test_ocsf_event_of_an_anonymous_caller_keeps_the_name_it_gave() -> None:
    event = ocsf_event(_envelope(_anonymous_denied()))
    assert event["actor"]["user"]["uid"] == "anonymous"
    assert event["actor"]["user"]["type"] == "Unknown"
    assert event["actor"]["user"]["type_id"] == 0
    assert event["severity_id"] == 3
    assert "resources" not in event


@pytest.mark.parametrize("version", OCSF_VERSIONS)
def test_ocsf_events_validate_against_the_ocsf_api_activity_schema(
    envelope: dict[str, Any], version: str
) -> None:
    assert _schema_errors(ocsf_event(envelope), version) == []


def test_every_activity_in_the_table_gives_a_valid_ocsf_event() -> None:
    base = _envelope(crypto_used(KEY_ID))
    for operation in OCSF_ACTIVITY:
        assert _schema_errors(ocsf_event(_with_operation(base, operation))) == [], operation


@pytest.mark.parametrize(
    ("what", "break_it"),
    [
        ("time as a string", lambda e: e.update(time="2026-11-25T01:55:00Z")),
        ("seq as a string", lambda e: e["metadata"].update(sequence="5")),
        ("activity_id outside the enum", lambda e: e.update(activity_id=5)),
        ("type_uid of another class", lambda e: e.update(type_uid=300201)),
        ("class_uid of another class", lambda e: e.update(class_uid=3002)),
        ("no api object", lambda e: e.pop("api")),
        ("no request uid", lambda e: e["api"]["request"].pop("uid")),
        ("hash as an unregistered metadata field", lambda e: e["metadata"].update(hash="ab")),
        ("source ip that is not an address", lambda e: e["src_endpoint"].update(ip="nope")),
    ],
)
def test_schema_validation_rejects_an_ocsf_event_of_the_wrong_shape(
    what: str, break_it: Any
) -> None:
    event = ocsf_event(_envelope(crypto_used(KEY_ID)))
    assert _schema_errors(event) == []
    break_it(event)
    assert _schema_errors(event) != [], what


# ------------------------------------------------------------------- ECS mapping


def test_ecs_document_maps_a_successful_decrypt_like_elastics_cloudtrail_integration() -> None:
    envelope = _envelope(crypto_used(KEY_ID, "Decrypt", key_ref="alias/payments"), seq=4)
    record = envelope["record"]
    doc = ecs_document(envelope)

    assert doc["@timestamp"] == "2026-11-25T01:55:00.000Z"
    assert doc["ecs"] == {"version": "8.11.0"}
    assert doc["event"] == {
        "kind": "event",
        "category": ["api"],
        "type": ["access"],
        "action": "Decrypt",
        "outcome": "success",
        "id": record["eventID"],
        "provider": "kms.amazonaws.com",
        "module": "aws",
        "dataset": "aws.cloudtrail",
        "sequence": 4,
        "hash": envelope["recordHash"],
    }
    assert doc["cloud"] == {"provider": "aws", "region": REGION, "account": {"id": ACCOUNT}}
    assert doc["user"] == {"id": PRINCIPAL, "name": "alice"}
    assert doc["source"] == {"address": "127.0.0.1", "ip": "127.0.0.1"}
    assert doc["user_agent"] == {"original": USER_AGENT}
    assert doc["related"] == {"user": ["alice"], "ip": ["127.0.0.1"]}
    cloudtrail = doc["aws"]["cloudtrail"]
    assert cloudtrail["event_type"] == "AwsApiCall"
    assert cloudtrail["event_version"] == "1.11"
    assert cloudtrail["request_id"] == record["requestID"]
    assert cloudtrail["read_only"] is True
    assert cloudtrail["recipient_account_id"] == ACCOUNT
    assert cloudtrail["user_identity"] == {"type": "IAMUser", "arn": PRINCIPAL}
    assert json.loads(cloudtrail["request_parameters"]) == record["requestParameters"]
    assert cloudtrail["flattened"]["request_parameters"]["keyId"] == "alias/payments"
    for member, name in (
        ("additionalEventData", "additional_eventdata"),
        ("responseElements", "response_elements"),
    ):
        if record.get(member) is None:
            assert name not in cloudtrail
        else:
            assert json.loads(cloudtrail[name]) == record[member]
            assert cloudtrail["flattened"][name] == record[member]
    assert cloudtrail["resources"] == [
        {"arn": key_arn(KEY_ID), "account_id": ACCOUNT, "type": "AWS::KMS::Key"}
    ]
    assert doc["keyledger"] == {
        "ledger": LEDGER_ID,
        "seq": 4,
        "recordHash": envelope["recordHash"],
        "prev": envelope["prev"],
    }
    assert "error" not in doc
    assert "original" not in doc["event"]


def test_ecs_document_of_an_access_denied_call_is_a_denied_failure() -> None:
    doc = ecs_document(_envelope(EVENTS["Decrypt denied"]()))
    assert doc["event"]["outcome"] == "failure"
    assert doc["event"]["type"] == ["access", "denied"]
    assert doc["error"] == {"code": "AccessDeniedException", "message": "User is not authorized."}
    assert doc["aws"]["cloudtrail"]["error_code"] == "AccessDeniedException"
    assert doc["aws"]["cloudtrail"]["error_message"] == "User is not authorized."


def test_ecs_document_of_key_management_is_configuration() -> None:
    created = ecs_document(_envelope(key_created(KEY_ID)))
    assert created["event"]["category"] == ["api", "configuration"]
    assert created["event"]["type"] == ["creation"]
    assert (
        json.loads(created["aws"]["cloudtrail"]["response_elements"])["keyMetadata"]["keyId"]
        == KEY_ID
    )
    disabled = ecs_document(_envelope(key_disabled(KEY_ID)))
    assert disabled["event"]["type"] == ["change"]


def test_ecs_document_of_a_service_event_has_no_user_and_keeps_its_details() -> None:
    doc = ecs_document(_envelope(key_deleted_by_service(KEY_ID)))
    assert doc["event"]["category"] == ["configuration"]
    assert doc["event"]["type"] == ["deletion"]
    assert "user" not in doc and "user_agent" not in doc
    assert doc["source"] == {"address": "AWS Internal"}
    assert doc["aws"]["cloudtrail"]["user_identity"] == {"invoked_by": "AWS Internal"}
    assert doc["aws"]["cloudtrail"]["event_type"] == "AwsServiceEvent"
    assert "request_id" not in doc["aws"]["cloudtrail"]

    rotation = ecs_document(_envelope(_service_rotation(KEY_ID)))
    assert rotation["event"]["type"] == ["change"]
    details = rotation["aws"]["cloudtrail"]["flattened"]["service_event_details"]
    assert details["rotationType"] == "AUTOMATIC"


def test_ecs_document_of_a_principal_event_is_iam_with_the_target_user_related() -> None:
    doc = ecs_document(_envelope(_create_user()))
    assert doc["event"]["provider"] == "iam.amazonaws.com"
    assert doc["event"]["category"] == ["api", "iam"]
    assert doc["event"]["type"] == ["user", "creation"]
    assert doc["related"]["user"] == ["alice", "bob"]
    assert doc["aws"]["cloudtrail"]["user_identity"]["access_key_id"] == "AKLDEXAMPLEEXAMPLE12"
    policy = ecs_document(_envelope(_put_principal_policy()))
    assert policy["event"]["type"] == ["user", "change"]


def test_ecs_categorization_uses_only_allowed_values(envelope: dict[str, Any]) -> None:
    for operation in [envelope["record"]["eventName"], *OCSF_ACTIVITY]:
        event = ecs_document(_with_operation(envelope, operation))["event"]
        assert event["kind"] == "event"
        assert event["outcome"] in ("success", "failure")
        assert event["category"] and set(event["category"]) <= set(ECS_EXPECTED_TYPES)
        expected = set().union(*(ECS_EXPECTED_TYPES[c] for c in event["category"]))
        assert event["type"] and set(event["type"]) <= expected, (operation, event)


# ------------------------------------------------------------- both views


def test_both_views_map_back_to_the_envelopes_chain_position(envelope: dict[str, Any]) -> None:
    header = {k: envelope[k] for k in ("ledger", "seq", "recordHash", "prev")}
    event = ocsf_event(envelope)
    assert event["unmapped"]["keyledger"] == header
    assert event["metadata"]["sequence"] == envelope["seq"]
    assert event["metadata"]["uid"] == envelope["record"]["eventID"]
    doc = ecs_document(envelope)
    assert doc["keyledger"] == header
    assert doc["event"]["sequence"] == envelope["seq"]
    assert doc["event"]["hash"] == envelope["recordHash"]
    assert doc["event"]["id"] == envelope["record"]["eventID"]


def test_views_are_pure_functions_of_the_envelope(envelope: dict[str, Any]) -> None:
    before = copy.deepcopy(envelope)
    assert ocsf_event(envelope) == ocsf_event(copy.deepcopy(envelope))
    assert ecs_document(envelope) == ecs_document(copy.deepcopy(envelope))
    assert envelope == before


def test_views_carry_no_material_and_no_raw_copy_of_the_record() -> None:
    envelope = _envelope(key_created(KEY_ID))
    for view in (ocsf_event(envelope), ecs_document(envelope)):
        published = orjson.dumps(view)
        assert WRAPPED_MARKER not in published
        assert WRAPPED_B64.encode() not in published
        assert b'"raw_data"' not in published
        assert b'"original":{' not in published
        assert b'"eventVersion":"1.11","userIdentity"' not in published


def test_views_reject_an_envelope_without_a_record() -> None:
    envelope = _envelope(crypto_used(KEY_ID))
    del envelope["record"]
    with pytest.raises(KeyError):
        ocsf_event(envelope)
    with pytest.raises(KeyError):
        ecs_document(envelope)
