"""The CloudTrail view of a stored ledger event, and the envelope it is published in.

The view is a pure function of one stored event and its chain position, so a verifier
can re-derive it from the stored bytes at ``seq`` and compare it with a SIEM copy.

Only these parts of a stored event are ever read: ``call``, ``request``, ``response``,
``additional``, ``key_arn``, ``error_code``, ``error_message``, ``read_only`` and
``timestamp``. Anything else a stored event carries for replay (HSM-wrapped material,
version ids, ...) never reaches the view.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

EVENT_VERSION = "1.11"
AWS_INTERNAL = "AWS Internal"
IAM_EVENT_SOURCE = "iam.amazonaws.com"
EVENT_SOURCE = "kms.amazonaws.com"
RESOURCE_TYPE = "AWS::KMS::Key"

# Fixed namespace for eventIDs: uuid5(NAMESPACE_URL, "urn:keyledger:cloudtrail-event-id").
EVENT_ID_NAMESPACE = uuid.UUID("6d07731b-8899-55dc-ace0-095a9d62eeab")


def event_id(ledger_id: str, seq: int) -> str:
    """The deterministic CloudTrail ``eventID`` of the record at ``seq`` of a ledger.

    A republished record gets the same eventID, so SIEMs can deduplicate on it.
    """
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{ledger_id}:{seq}"))


def event_time(timestamp: str) -> str:
    """RFC 3339 UTC with ``Z`` and whole seconds (truncated), as CloudTrail writes it.

    Raises ValueError if ``timestamp`` is not ISO 8601 or has no UTC offset.
    """
    parsed = datetime.fromisoformat(timestamp)
    if parsed.tzinfo is None:
        raise ValueError("event timestamp has no UTC offset")
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cloudtrail_record(
    event: dict[str, Any], *, seq: int, record_hash: bytes, prev: bytes, ledger_id: str
) -> dict[str, Any]:
    """The published value for one stored event: the CloudTrail record in its envelope.

    Returns ``{"ledger", "seq", "recordHash", "prev", "record"}`` where ``record`` is the
    CloudTrail-shaped record (eventVersion "1.11") and the hashes are lowercase hex.

    Raises KeyError if the event lacks ``call`` (or ``call.operation``) or
    ``timestamp``, and ValueError if the timestamp is not ISO 8601 with an offset.
    """
    return {
        "ledger": ledger_id,
        "seq": seq,
        "recordHash": record_hash.hex(),
        "prev": prev.hex(),
        "record": cloudtrail_view(event, seq=seq, ledger_id=ledger_id),
    }


def cloudtrail_view(event: dict[str, Any], *, seq: int, ledger_id: str) -> dict[str, Any]:
    """The bare CloudTrail record for one stored event (no envelope).

    Raises KeyError if the event lacks ``call`` (or ``call.operation``) or
    ``timestamp``, and ValueError if the timestamp is not ISO 8601 with an offset.
    """
    call: dict[str, Any] = event["call"]
    key_arn: str | None = event.get("key_arn")
    service = bool(call.get("service_initiated"))
    region = call.get("region")
    call_account = call.get("account_id")
    recipient = _arn_account(key_arn) or call_account

    record: dict[str, Any] = {
        "eventVersion": EVENT_VERSION,
        "userIdentity": _user_identity(call, service=service),
        "eventTime": event_time(event["timestamp"]),
        # Principal management (users, access keys, identity policies) is IAM's.
        "eventSource": IAM_EVENT_SOURCE
        if str(event.get("topic", "")).startswith("ledger.domain.principals:")
        else EVENT_SOURCE,
        "eventName": call["operation"],
        "awsRegion": region,
        "sourceIPAddress": call.get("source_ip") or (AWS_INTERNAL if service else None),
        "userAgent": call.get("user_agent") or (AWS_INTERNAL if service else None),
        # Service events (RotateKey, DeleteKey) carry no request or response in AWS.
        "requestParameters": None if service else event.get("request"),
        "responseElements": None if service else event.get("response"),
    }
    if event.get("additional") is not None and not service:
        record["additionalEventData"] = event["additional"]
    if call.get("request_id") and not service:  # AWS service events have no requestID
        record["requestID"] = call["request_id"]
    record["eventID"] = event_id(ledger_id, seq)
    record["readOnly"] = bool(event.get("read_only", False))
    if key_arn:
        record["resources"] = [{"accountId": recipient, "type": RESOURCE_TYPE, "ARN": key_arn}]
    record["eventType"] = "AwsServiceEvent" if service else "AwsApiCall"
    record["managementEvent"] = True
    record["recipientAccountId"] = recipient
    record["eventCategory"] = "Management"
    if event.get("error_code") is not None:
        record["errorCode"] = event["error_code"]
    if event.get("error_message") is not None:
        record["errorMessage"] = event["error_message"]
    if service and event.get("additional") is not None:
        record["serviceEventDetails"] = event["additional"]
    return record


def _user_identity(call: dict[str, Any], *, service: bool) -> dict[str, Any]:
    account = call.get("account_id")
    if service:  # as AWS's RotateKey and DeleteKey examples
        return {"accountId": account, "invokedBy": AWS_INTERNAL}
    arn: str | None = call.get("principal")
    identity: dict[str, Any] = {
        "type": _identity_type(arn),
        "principalId": call.get("principal_id") or arn,
        "arn": arn,
        "accountId": _arn_account(arn) or account,
    }
    user_name = _user_name(arn)
    if user_name is not None:
        identity["userName"] = user_name
    if call.get("access_key_id"):  # as AWS records the access key that signed the call
        identity["accessKeyId"] = call["access_key_id"]
    return identity


def _arn_resource(arn: str | None) -> str | None:
    """The resource part of an ARN (``user/path/name``), or None if not an ARN."""
    if not arn or not arn.startswith("arn:"):
        return None
    parts = arn.split(":", 5)
    return parts[5] if len(parts) == 6 else None


def _arn_account(arn: str | None) -> str | None:
    if not arn or not arn.startswith("arn:"):
        return None
    parts = arn.split(":", 5)
    return (parts[4] or None) if len(parts) == 6 else None


def _identity_type(arn: str | None) -> str:
    resource = _arn_resource(arn)
    if resource is None:
        return "Unknown"
    if resource == "root":
        return "Root"
    if resource.startswith("user/"):
        return "IAMUser"
    if resource.startswith("assumed-role/"):
        return "AssumedRole"
    return "Unknown"


def _user_name(arn: str | None) -> str | None:
    """``alice`` for ``arn:aws:iam::111122223333:user/division/alice`` (path dropped)."""
    resource = _arn_resource(arn)
    if resource is None or not resource.startswith("user/"):
        return None
    return resource.rsplit("/", 1)[-1] or None
