"""The CloudTrail view of a stored ledger event, and the envelope it is published in.

The view is a pure function of one stored event and its chain position, so a verifier
can re-derive it from the stored bytes at ``seq`` and compare it with a SIEM copy.

Only these parts of a stored event are ever read: ``call``, ``request``, ``response``,
``additional``, ``key_arn``, ``error_code``, ``error_message``, ``read_only`` and
``timestamp``. Anything else a stored event carries for replay (HSM-wrapped material,
version ids, ...) never reaches the view.

Per-operation shaping follows the records AWS KMS writes (the developer guide's
"Examples of AWS KMS log entries"; copies in ``shared/reference/cloudtrail/``). It is
done here, not in the stored events, so events stored before a shaping change render
the same way as new ones. Security: the view also drops the top-level members AWS
never logs (plaintext, ciphertext blobs, data keys, signatures, MACs,
random bytes, grant and import tokens, shared secrets, GetKeyPolicy bodies), as a
second line behind the service never storing them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# The deterministic eventID of the record at a seq (a republished record gets the same
# one, so SIEMs can deduplicate on it); the offline archive validator derives it too.
from ledger.archive_verify import event_id as event_id  # re-exported

EVENT_VERSION = "1.11"
AWS_INTERNAL = "AWS Internal"
IAM_EVENT_SOURCE = "iam.amazonaws.com"
EVENT_SOURCE = "kms.amazonaws.com"
RESOURCE_TYPE = "AWS::KMS::Key"


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
    operation: str = call["operation"]
    key_arn: str | None = event.get("key_arn")
    request: Any = event.get("request")
    additional: Any = event.get("additional")
    failed = event.get("error_code") is not None
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
        "eventName": operation,
        "awsRegion": region,
        "sourceIPAddress": call.get("source_ip") or (AWS_INTERNAL if service else None),
        "userAgent": call.get("user_agent") or (AWS_INTERNAL if service else None),
        # Service events (RotateKey, DeleteKey) carry no request or response in AWS.
        "requestParameters": None if service else _request_parameters(operation, request),
        "responseElements": None
        if service or failed
        else _response_elements(operation, event.get("response"), additional, key_arn),
    }
    extra = None if service or failed else _additional_event_data(operation, additional)
    if extra is not None:
        record["additionalEventData"] = extra
    if call.get("request_id") and not service:  # AWS service events have no requestID
        record["requestID"] = call["request_id"]
    record["eventID"] = event_id(ledger_id, seq)
    record["readOnly"] = bool(event.get("read_only", False))
    resources = _resources(operation, key_arn, request, None if failed else additional)
    if resources is not None:
        record["resources"] = resources
    record["eventType"] = "AwsServiceEvent" if service else "AwsApiCall"
    record["managementEvent"] = True
    record["recipientAccountId"] = recipient
    record["eventCategory"] = "Management"
    if event.get("error_code") is not None:
        record["errorCode"] = event["error_code"]
    if event.get("error_message") is not None:
        record["errorMessage"] = event["error_message"]
    if service:
        details = _service_event_details(operation, request, additional)
        if details is not None:
            record["serviceEventDetails"] = details
    return record


# ----------------------------------------------------------------- per-operation shaping

# Members AWS never writes to CloudTrail (camelCase, as CloudTrail spells them).
NEVER_LOGGED = frozenset(
    {
        "plaintext",
        "ciphertextBlob",
        "ciphertextForRecipient",
        "signature",
        "mac",
        "message",
        "grantToken",
        "grantTokens",
        "importToken",
        "encryptedKeyMaterial",
        "sharedSecret",
        "privateKeyPlaintext",
        "privateKeyCiphertextBlob",
        "secretAccessKey",
    }
)
# Operations whose responseElements AWS logs as null (GetKeyPolicy: the policy body).
NULL_RESPONSE = frozenset({"GetKeyPolicy", "GenerateRandom"})
# Operations with asymmetric or HMAC keys, whose material never rotates: AWS's records
# carry no additionalEventData (ct-sign, ct-verify, ct-generatemac, ...).
NO_ADDITIONAL = frozenset({"Sign", "Verify", "GenerateMac", "VerifyMac", "DeriveSharedSecret"})


def _scrub(value: Any) -> Any:
    """``value`` (a copy) without its NEVER_LOGGED top-level members. Nested maps are
    left alone: they hold caller data (encryption contexts, tags) whose keys are the
    caller's own names, which AWS logs as sent."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in NEVER_LOGGED}
    return value


def _camel_tags(tags: Any) -> Any:
    """``[{"TagKey", "TagValue"}]`` as CloudTrail writes it: ``[{"tagKey", "tagValue"}]``."""
    if not isinstance(tags, list):
        return tags
    return [
        {k[:1].lower() + k[1:]: v for k, v in t.items()} if isinstance(t, dict) else t for t in tags
    ]


def _request_parameters(operation: str, request: Any) -> Any:
    if not request:  # nothing sent (GenerateRandom without NumberOfBytes): AWS logs null
        return None
    if not isinstance(request, dict):
        return request
    out: dict[str, Any] = _scrub(request)
    if not out:  # only never-logged members were sent (RetireGrant by token)
        return None
    if operation == "CreateKey" and "keySpec" in out:
        # AWS still logs the deprecated twin of KeySpec (createkey-1.08.json).
        out.setdefault("customerMasterKeySpec", out["keySpec"])
    if "tags" in out:
        out["tags"] = _camel_tags(out["tags"])
    return out


def _response_elements(operation: str, response: Any, additional: Any, key_arn: str | None) -> Any:
    if operation in NULL_RESPONSE:
        return None
    if operation == "CreateGrant" and isinstance(response, dict):
        # grantId and the key ARN (creategrant-1.02.json); never the grant token.
        return {"grantId": response.get("grantId"), "keyId": key_arn}
    if operation == "ScheduleKeyDeletion" and isinstance(response, dict):
        # schedulekeydeletion-1.08.json: keyId, keyState, deletionDate only.
        return {k: v for k, v in _scrub(response).items() if k != "pendingWindowInDays"}
    if operation == "ImportKeyMaterial" and isinstance(additional, dict):
        # AWS logs the new material's id in responseElements, beside the key ARN.
        return {"keyId": key_arn, "keyMaterialId": additional.get("keyMaterialId")}
    return _scrub(response)


def _additional_event_data(operation: str, additional: Any) -> Any:
    if not isinstance(additional, dict):
        return additional
    if operation == "ImportKeyMaterial" or operation in NO_ADDITIONAL:
        return None  # ImportKeyMaterial: rendered in responseElements
    if operation == "ReEncrypt":
        # AWS: source and destination material ids; the source key is a resource.
        return {
            "sourceKeyMaterialId": additional.get("sourceKeyMaterialId"),
            "destinationKeyMaterialId": additional.get("keyMaterialId"),
        }
    return _scrub(additional)


def _resource(arn: str) -> dict[str, Any]:
    return {"accountId": _arn_account(arn), "type": RESOURCE_TYPE, "ARN": arn}


def _resources(
    operation: str, key_arn: str | None, request: Any, additional: Any
) -> list[dict[str, Any]] | None:
    """``resources[]``: the resolved key; AWS adds the alias for CreateAlias and lists
    the source key first for ReEncrypt. None when the call resolved no key."""
    if operation == "GenerateRandom":
        return []  # as AWS: the operation uses no key
    if not key_arn:
        return None
    out = [_resource(key_arn)]
    if operation == "ReEncrypt" and isinstance(additional, dict):
        source = additional.get("sourceKeyArn")
        if isinstance(source, str) and source:
            out.insert(0, _resource(source))
    if operation == "CreateAlias" and isinstance(request, dict):
        alias = _alias_arn(key_arn, request.get("aliasName"))
        if alias is not None:
            out.append(_resource(alias))
    return out


def _alias_arn(key_arn: str, alias_name: Any) -> str | None:
    """The alias ARN in the key's partition, region and account (aliases live there)."""
    if not isinstance(alias_name, str) or not alias_name.startswith("alias/"):
        return None
    parts = key_arn.split(":", 5)
    if len(parts) != 6:
        return None
    return ":".join([*parts[:5], alias_name])


def _service_event_details(operation: str, request: Any, additional: Any) -> Any:
    if operation == "DeleteKey":
        return None  # deletekey-1.08.json has none
    if operation == "DeleteExpiredKeyMaterial" and isinstance(additional, dict):
        key_id = request.get("keyId") if isinstance(request, dict) else None
        return {"keyId": key_id, "keyMaterialId": additional.get("keyMaterialId")}
    return _scrub(additional)  # RotateKey: stored in AWS's shape (rotatekey-1.11.json)


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
