"""The OCSF and ECS views of a published audit record.

Both views are pure functions of the envelope ``{"ledger", "seq", "recordHash", "prev",
"record"}`` that ``consumers.cloudtrail.cloudtrail_record`` builds, so a verifier can
re-derive a SIEM copy from the stored event at ``seq`` and compare. They read only the
CloudTrail record, which already omits plaintext, key material, ciphertext blobs,
signatures and grant tokens; neither view adds ``raw_data`` / ``event.original`` (a
second copy of the whole record) nor anything from outside the envelope.

OCSF (``ocsf_event``): API Activity, class 6003, in category 6 Application Activity,
validated against the OCSF ``OCSF_VERSION`` schema with the ``cloud`` profile.

* ``activity_id`` comes from ``OCSF_ACTIVITY``, one explicit entry per operation
  KeyLedger records: 1 Create, 2 Read, 3 Update, 4 Delete; cryptographic calls are 99
  Other with the operation name as ``activity_name``; the API's own ``Unknown`` label
  (a request naming no KMS operation) is OCSF's 0 Unknown. An operation missing from
  the table maps to (99, its name). ``type_uid`` = 6003 * 100 + ``activity_id``.
* The proof link: ``metadata.uid`` is the CloudTrail ``eventID``, ``metadata.sequence``
  the ledger ``seq`` and ``metadata.log_name`` the ledger id. OCSF has no attribute for
  a record hash, and ``metadata.extension`` needs an extension registered with OCSF (an
  unregistered one fails validation), so ``recordHash`` and ``prev`` go, with the ledger
  id and seq again, under ``unmapped.keyledger``: ``unmapped`` is where OCSF keeps
  source data it has no attribute for, and one object there carries the whole envelope
  header the same way for every record.
* ``severity_id``: 1 Informational for a success and for a DryRun that would have
  succeeded; 3 Medium for an authentication or authorization denial (someone tried to
  use a key or change security settings without the right: what a SOC triages); 2 Low
  for any other failure (disabled key, bad ciphertext, validation, internal error).

ECS (``ecs_document``): the document Elastic's AWS CloudTrail integration produces
(``event.module`` aws, ``event.dataset`` aws.cloudtrail, ``aws.cloudtrail.*`` names as
that integration maps them: JSON members as strings plus ``aws.cloudtrail.flattened.*``
objects), ECS ``ECS_VERSION``. ``event.sequence`` is the ledger ``seq`` and
``event.hash`` the ``recordHash`` (ECS: a hash of the raw event, for integrity); the
envelope header is also under ``keyledger.{ledger, seq, recordHash, prev}``.
"""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime
from typing import Any

OCSF_VERSION = "1.5.0"
ECS_VERSION = "8.11.0"
PRODUCT_NAME = "KeyLedger"
VENDOR_NAME = "KeyLedger"

CLASS_UID = 6003
CLASS_NAME = "API Activity"
CATEGORY_UID = 6
CATEGORY_NAME = "Application Activity"

UNKNOWN, CREATE, READ, UPDATE, DELETE, OTHER = 0, 1, 2, 3, 4, 99
_CAPTIONS = {
    UNKNOWN: "Unknown",
    CREATE: "Create",
    READ: "Read",
    UPDATE: "Update",
    DELETE: "Delete",
    OTHER: "Other",
}
STATUS_SUCCESS, STATUS_FAILURE = 1, 2
SEVERITY_INFORMATIONAL, SEVERITY_LOW, SEVERITY_MEDIUM = 1, 2, 3
_SEVERITY_CAPTIONS = {
    SEVERITY_INFORMATIONAL: "Informational",
    SEVERITY_LOW: "Low",
    SEVERITY_MEDIUM: "Medium",
}
ACCOUNT_TYPE_AWS = 10  # OCSF account.type_id "AWS Account"
OBSERVABLE_IP, OBSERVABLE_USER_NAME, OBSERVABLE_RESOURCE_UID = 2, 4, 10

#: Operation (CloudTrail ``eventName``) -> (OCSF ``activity_id``, ``activity_name``).
#: Every KMS operation of botocore's model (unimplemented ones are still recorded, as
#: refused), KMS service events, the IAM-side principal operations, the STS call and
#: the API's ``Unknown`` label.
OCSF_ACTIVITY: dict[str, tuple[int, str]] = {
    # KMS: keys, aliases, grants, policies, custom key stores.
    "CreateKey": (CREATE, "Create"),
    "CreateAlias": (CREATE, "Create"),
    "CreateGrant": (CREATE, "Create"),
    "CreateCustomKeyStore": (CREATE, "Create"),
    "ReplicateKey": (CREATE, "Create"),
    "DescribeKey": (READ, "Read"),
    "DescribeCustomKeyStores": (READ, "Read"),
    "GetKeyLastUsage": (READ, "Read"),
    "GetKeyPolicy": (READ, "Read"),
    "GetKeyRotationStatus": (READ, "Read"),
    "GetParametersForImport": (READ, "Read"),
    "GetPublicKey": (READ, "Read"),
    "ListAliases": (READ, "Read"),
    "ListGrants": (READ, "Read"),
    "ListKeyPolicies": (READ, "Read"),
    "ListKeyRotations": (READ, "Read"),
    "ListKeys": (READ, "Read"),
    "ListResourceTags": (READ, "Read"),
    "ListRetirableGrants": (READ, "Read"),
    "CancelKeyDeletion": (UPDATE, "Update"),
    "ConnectCustomKeyStore": (UPDATE, "Update"),
    "DisableKey": (UPDATE, "Update"),
    "DisableKeyRotation": (UPDATE, "Update"),
    "DisconnectCustomKeyStore": (UPDATE, "Update"),
    "EnableKey": (UPDATE, "Update"),
    "EnableKeyRotation": (UPDATE, "Update"),
    "ImportKeyMaterial": (UPDATE, "Update"),
    "PutKeyPolicy": (UPDATE, "Update"),
    "RotateKeyOnDemand": (UPDATE, "Update"),
    "ScheduleKeyDeletion": (UPDATE, "Update"),  # the key is deleted later, by DeleteKey
    "TagResource": (UPDATE, "Update"),
    "UntagResource": (UPDATE, "Update"),
    "UpdateAlias": (UPDATE, "Update"),
    "UpdateCustomKeyStore": (UPDATE, "Update"),
    "UpdateKeyDescription": (UPDATE, "Update"),
    "UpdatePrimaryRegion": (UPDATE, "Update"),
    "DeleteAlias": (DELETE, "Delete"),
    "DeleteCustomKeyStore": (DELETE, "Delete"),
    "DeleteImportedKeyMaterial": (DELETE, "Delete"),
    "RetireGrant": (DELETE, "Delete"),
    "RevokeGrant": (DELETE, "Delete"),
    # KMS: cryptographic calls.
    "Decapsulate": (OTHER, "Decapsulate"),
    "Decrypt": (OTHER, "Decrypt"),
    "DeriveSharedSecret": (OTHER, "DeriveSharedSecret"),
    "Encapsulate": (OTHER, "Encapsulate"),
    "Encrypt": (OTHER, "Encrypt"),
    "GenerateDataKey": (OTHER, "GenerateDataKey"),
    "GenerateDataKeyPair": (OTHER, "GenerateDataKeyPair"),
    "GenerateDataKeyPairWithoutPlaintext": (OTHER, "GenerateDataKeyPairWithoutPlaintext"),
    "GenerateDataKeyWithoutPlaintext": (OTHER, "GenerateDataKeyWithoutPlaintext"),
    "GenerateMac": (OTHER, "GenerateMac"),
    "GenerateRandom": (OTHER, "GenerateRandom"),
    "ReEncrypt": (OTHER, "ReEncrypt"),
    "Sign": (OTHER, "Sign"),
    "Verify": (OTHER, "Verify"),
    "VerifyMac": (OTHER, "VerifyMac"),
    # KMS service events (AwsServiceEvent).
    "RotateKey": (UPDATE, "Update"),
    "DeleteKey": (DELETE, "Delete"),
    "DeleteExpiredKeyMaterial": (DELETE, "Delete"),
    # IAM side: principals, access keys, identity policies.
    "CreateUser": (CREATE, "Create"),
    "CreateRole": (CREATE, "Create"),
    "CreateAccessKey": (CREATE, "Create"),
    "PutPrincipalPolicy": (UPDATE, "Update"),
    "EnablePrincipal": (UPDATE, "Update"),
    "DisablePrincipal": (UPDATE, "Update"),
    "DeletePrincipalPolicy": (DELETE, "Delete"),
    "DeletePrincipal": (DELETE, "Delete"),
    # STS, and a request whose X-Amz-Target names no KMS operation.
    "GetCallerIdentity": (READ, "Read"),
    "Unknown": (UNKNOWN, "Unknown"),
}

#: Error codes meaning the caller was not authenticated or not authorized.
DENIAL_ERRORS = frozenset(
    {
        "AccessDeniedException",
        "IncompleteSignatureException",
        "InvalidSignatureException",
        "MissingAuthenticationTokenException",
        "UnrecognizedClientException",
    }
)
DRY_RUN_SUCCEEDED = "DryRunOperationException"

# ECS event.type for each OCSF activity (crypto use is an access to the key).
_ECS_TYPE = {
    UNKNOWN: "info",
    CREATE: "creation",
    READ: "info",
    UPDATE: "change",
    DELETE: "deletion",
    OTHER: "access",
}


def ocsf_activity(operation: str) -> tuple[int, str]:
    """``(activity_id, activity_name)`` of an operation; (99, name) if not in the table."""
    return OCSF_ACTIVITY.get(operation, (OTHER, operation))


def ocsf_event(envelope: dict[str, Any]) -> dict[str, Any]:
    """The OCSF API Activity (class 6003) event for one published envelope.

    Raises KeyError if the envelope lacks ``record``, ``seq``, ``ledger`` or
    ``recordHash``, or the record lacks ``eventName``, ``eventTime``, ``eventSource``
    or ``eventID``; ValueError if ``eventTime`` is not ISO 8601. Security: carries only
    what the CloudTrail record carries (no secrets), never ``raw_data``.
    """
    record: dict[str, Any] = envelope["record"]
    operation: str = record["eventName"]
    activity_id, activity_name = ocsf_activity(operation)
    failed = record.get("errorCode") is not None
    service = record.get("eventType") == "AwsServiceEvent"
    identity: dict[str, Any] = record.get("userIdentity") or {}
    recipient = record.get("recipientAccountId")

    event: dict[str, Any] = {
        "activity_id": activity_id,
        "activity_name": activity_name,
        "category_uid": CATEGORY_UID,
        "category_name": CATEGORY_NAME,
        "class_uid": CLASS_UID,
        "class_name": CLASS_NAME,
        "type_uid": CLASS_UID * 100 + activity_id,
        "type_name": f"{CLASS_NAME}: {_CAPTIONS.get(activity_id, 'Other')}",
        "time": _epoch_ms(record["eventTime"]),
        "severity_id": _severity_id(record.get("errorCode")),
        "status_id": STATUS_FAILURE if failed else STATUS_SUCCESS,
        "status": "Failure" if failed else "Success",
        "metadata": _ocsf_metadata(envelope, record),
        "api": _ocsf_api(record, operation),
        "actor": _ocsf_actor(identity, service=service),
        "src_endpoint": _ocsf_src_endpoint(record.get("sourceIPAddress"), service=service),
        "cloud": _without_none(
            {
                "provider": "AWS",
                "region": record.get("awsRegion"),
                "account": _ocsf_account(recipient or identity.get("accountId")),
            }
        ),
    }
    event["severity"] = _SEVERITY_CAPTIONS[event["severity_id"]]
    if failed:
        event["status_code"] = record["errorCode"]
        if record.get("errorMessage") is not None:
            event["status_detail"] = record["errorMessage"]
    if not service and record.get("userAgent"):
        event["http_request"] = {"user_agent": record["userAgent"]}
    resources = [
        _without_none(
            {
                "uid": r.get("ARN"),
                "type": r.get("type"),
                "owner": {"account": _ocsf_account(r.get("accountId"))}
                if r.get("accountId")
                else None,
            }
        )
        for r in record.get("resources") or []
        if r.get("ARN")
    ]
    if resources:
        event["resources"] = resources
    observables = _ocsf_observables(event)
    if observables:
        event["observables"] = observables
    event["unmapped"] = _ocsf_unmapped(envelope, record)
    return event


def ecs_document(envelope: dict[str, Any]) -> dict[str, Any]:
    """The Elastic Common Schema document for one published envelope.

    Raises KeyError if the envelope lacks ``record``, ``seq``, ``ledger`` or
    ``recordHash``, or the record lacks ``eventName``, ``eventTime``, ``eventSource``
    or ``eventID``; ValueError if ``eventTime`` is not ISO 8601. Security: carries only
    what the CloudTrail record carries (no secrets), never ``event.original``.
    """
    record: dict[str, Any] = envelope["record"]
    operation: str = record["eventName"]
    activity_id, _ = ocsf_activity(operation)
    error_code = record.get("errorCode")
    service = record.get("eventType") == "AwsServiceEvent"
    identity: dict[str, Any] = record.get("userIdentity") or {}
    source = record.get("sourceIPAddress")
    source_ip = source if _is_ip(source) else None
    # As Elastic's integration: the caller's account, else the recipient.
    account_id = identity.get("accountId") or record.get("recipientAccountId")

    doc: dict[str, Any] = {
        "@timestamp": _iso_ms(record["eventTime"]),
        "ecs": {"version": ECS_VERSION},
        "event": {
            "kind": "event",
            "category": _ecs_categories(record, activity_id, service=service),
            "type": _ecs_types(record, activity_id),
            "action": operation,
            "outcome": "failure" if error_code is not None else "success",
            "id": record["eventID"],
            "provider": record["eventSource"],
            "module": "aws",
            "dataset": "aws.cloudtrail",
            "sequence": envelope["seq"],
            "hash": envelope["recordHash"],
        },
        "cloud": _without_none(
            {
                "provider": "aws",
                "region": record.get("awsRegion"),
                "account": {"id": account_id} if account_id else None,
            }
        ),
        "aws": {"cloudtrail": _ecs_cloudtrail(record)},
        "keyledger": _envelope_header(envelope),
    }
    user = _without_none({"id": identity.get("principalId"), "name": identity.get("userName")})
    if user:
        doc["user"] = user
    if source is not None:
        doc["source"] = _without_none({"address": source, "ip": source_ip})
    if not service and record.get("userAgent"):
        doc["user_agent"] = {"original": record["userAgent"]}
    if error_code is not None:
        doc["error"] = _without_none({"code": error_code, "message": record.get("errorMessage")})
    related = _ecs_related(record, identity, source_ip)
    if related:
        doc["related"] = related
    return doc


# ------------------------------------------------------------------------------ OCSF


def _ocsf_metadata(envelope: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    return _without_none(
        {
            "version": OCSF_VERSION,
            "product": {"name": PRODUCT_NAME, "vendor_name": VENDOR_NAME},
            "profiles": ["cloud"],
            "uid": record["eventID"],
            "sequence": envelope["seq"],
            "log_name": envelope["ledger"],
            "log_provider": PRODUCT_NAME,
            "log_version": record.get("eventVersion"),  # the CloudTrail record format
        }
    )


def _ocsf_api(record: dict[str, Any], operation: str) -> dict[str, Any]:
    api: dict[str, Any] = {"operation": operation, "service": {"name": record["eventSource"]}}
    if record.get("requestID"):  # OCSF requires request.uid; service events have none
        request: dict[str, Any] = {"uid": record["requestID"]}
        if record.get("requestParameters") is not None:
            request["data"] = record["requestParameters"]
        api["request"] = request
    response = _without_none(
        {
            "error": record.get("errorCode"),
            "error_message": record.get("errorMessage"),
            "data": record.get("responseElements"),
        }
    )
    if response:
        api["response"] = response
    return api


def _ocsf_actor(identity: dict[str, Any], *, service: bool) -> dict[str, Any]:
    account = _ocsf_account(identity.get("accountId"))
    if service or identity.get("invokedBy"):
        actor: dict[str, Any] = {"invoked_by": identity.get("invokedBy") or "AWS Internal"}
        if account is not None:
            actor["user"] = {"account": account}
        return actor
    principal_id = identity.get("principalId")
    arn = identity.get("arn")
    kind = identity.get("type") or "Unknown"
    user = _without_none(
        {
            "uid": principal_id or arn,
            "uid_alt": arn if arn and arn != principal_id else None,
            "name": identity.get("userName"),
            "type": kind,
            "type_id": {"IAMUser": 1, "Root": 2, "Unknown": 0}.get(kind, 99),
            "account": account,
            "credential_uid": identity.get("accessKeyId"),
        }
    )
    return {"user": user}


def _ocsf_account(account_id: str | None) -> dict[str, Any] | None:
    if not account_id:
        return None
    return {"uid": account_id, "type_id": ACCOUNT_TYPE_AWS, "type": "AWS Account"}


def _ocsf_src_endpoint(source: str | None, *, service: bool) -> dict[str, Any]:
    """OCSF requires a source endpoint: the IP; else the service (``AWS Internal``);
    else, for an in-process call (the CLI, no network), the name ``local``."""
    if source is not None and _is_ip(source):
        return {"ip": source}
    if source:
        return {"svc_name": source} if service else {"name": source}
    return {"name": "local"}


def _ocsf_observables(event: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ip = event["src_endpoint"].get("ip")
    if ip:
        out.append(
            {"name": "src_endpoint.ip", "type_id": OBSERVABLE_IP, "type": "IP Address", "value": ip}
        )
    name = event["actor"].get("user", {}).get("name")
    if name:
        out.append(
            {
                "name": "actor.user.name",
                "type_id": OBSERVABLE_USER_NAME,
                "type": "User Name",
                "value": name,
            }
        )
    for resource in event.get("resources", []):
        out.append(
            {
                "name": "resources.uid",
                "type_id": OBSERVABLE_RESOURCE_UID,
                "type": "Resource UID",
                "value": resource["uid"],
            }
        )
    return out


def _ocsf_unmapped(envelope: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    cloudtrail = _without_none(
        {
            "eventType": record.get("eventType"),
            "readOnly": record.get("readOnly"),
            "managementEvent": record.get("managementEvent"),
            "eventCategory": record.get("eventCategory"),
            "recipientAccountId": record.get("recipientAccountId"),
            "additionalEventData": record.get("additionalEventData"),
            "serviceEventDetails": record.get("serviceEventDetails"),
        }
    )
    return {"keyledger": _envelope_header(envelope), "cloudtrail": cloudtrail}


def _severity_id(error_code: str | None) -> int:
    if error_code is None or error_code == DRY_RUN_SUCCEEDED:
        return SEVERITY_INFORMATIONAL
    if error_code in DENIAL_ERRORS:
        return SEVERITY_MEDIUM
    return SEVERITY_LOW


# ------------------------------------------------------------------------------- ECS


def _ecs_categories(record: dict[str, Any], activity_id: int, *, service: bool) -> list[str]:
    """``api`` for every API call; plus ``iam`` for principal management, or
    ``configuration`` for key management and service events (crypto use by a caller is
    an API access only)."""
    categories = [] if service else ["api"]
    if record.get("eventSource") == "iam.amazonaws.com":
        categories.append("iam")
    elif activity_id != OTHER or service:
        categories.append("configuration")
    return categories


def _ecs_types(record: dict[str, Any], activity_id: int) -> list[str]:
    types = [_ECS_TYPE.get(activity_id, "info")]
    if record.get("eventSource") == "iam.amazonaws.com":
        types.insert(0, "user")
    error_code = record.get("errorCode")
    if error_code in DENIAL_ERRORS:
        types.append("denied")
    return types


def _ecs_cloudtrail(record: dict[str, Any]) -> dict[str, Any]:
    identity: dict[str, Any] = record.get("userIdentity") or {}
    out: dict[str, Any] = _without_none(
        {
            "event_version": record.get("eventVersion"),
            "event_type": record.get("eventType"),
            "event_category": record.get("eventCategory"),
            "request_id": record.get("requestID"),
            "read_only": record.get("readOnly"),
            "management_event": record.get("managementEvent"),
            "recipient_account_id": record.get("recipientAccountId"),
            "error_code": record.get("errorCode"),
            "error_message": record.get("errorMessage"),
            "user_identity": _without_none(
                {
                    "type": identity.get("type"),
                    "arn": identity.get("arn"),
                    "access_key_id": identity.get("accessKeyId"),
                    "invoked_by": identity.get("invokedBy"),
                }
            )
            or None,
        }
    )
    resources = [
        _without_none(
            {"arn": r.get("ARN"), "account_id": r.get("accountId"), "type": r.get("type")}
        )
        for r in record.get("resources") or []
    ]
    if resources:
        out["resources"] = resources
    flattened: dict[str, Any] = {}
    for member, name in (
        ("requestParameters", "request_parameters"),
        ("responseElements", "response_elements"),
        ("additionalEventData", "additional_eventdata"),
        ("serviceEventDetails", "service_event_details"),
    ):
        value = record.get(member)
        if value is None:
            continue
        # Elastic maps these as keyword strings, with the object under ``flattened``.
        out[name] = json.dumps(value, sort_keys=True, separators=(",", ":"))
        flattened[name] = value
    if flattened:
        out["flattened"] = flattened
    return out


def _ecs_related(
    record: dict[str, Any], identity: dict[str, Any], source_ip: str | None
) -> dict[str, Any]:
    users: list[str] = []
    params = record.get("requestParameters")
    target = params.get("principalName") if isinstance(params, dict) else None
    for name in (identity.get("userName"), target):
        if isinstance(name, str) and name and name not in users:
            users.append(name)
    related: dict[str, Any] = {}
    if users:
        related["user"] = users
    if source_ip is not None:
        related["ip"] = [source_ip]
    return related


# ---------------------------------------------------------------------------- shared


def _envelope_header(envelope: dict[str, Any]) -> dict[str, Any]:
    return _without_none(
        {
            "ledger": envelope["ledger"],
            "seq": envelope["seq"],
            "recordHash": envelope["recordHash"],
            "prev": envelope.get("prev"),
        }
    )


def _parse_time(event_time: str) -> datetime:
    """Raises ValueError if not ISO 8601 with an offset (CloudTrail writes ``...Z``)."""
    parsed = datetime.fromisoformat(event_time)
    if parsed.tzinfo is None:
        raise ValueError("eventTime has no UTC offset")
    return parsed


def _epoch_ms(event_time: str) -> int:
    parsed = _parse_time(event_time)
    return int(parsed.timestamp()) * 1000 + parsed.microsecond // 1000


def _iso_ms(event_time: str) -> str:
    parsed = _parse_time(event_time).astimezone(UTC)
    return parsed.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_ip(value: str | None) -> bool:
    if not value:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
