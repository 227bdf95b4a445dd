"""The pure fold from ledger events to read-model documents.

One fold serves the persistent catalog (incremental catch-up and rebuild) and
point-in-time answers (replay up to a seq or a time), so both give the same result.
Documents hold plain JSON; dates are ISO strings, turned into epoch seconds (the AWS
JSON wire form) only when answering.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger.domain.key_specs import key_algorithms

JSON = dict[str, Any]
TOPIC_PREFIX = "ledger.domain.model:"
PRINCIPAL_PREFIX = "ledger.domain.principals:Principal."


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def event_kind(event: JSON) -> tuple[str, str]:
    """``("Key", "Created")`` for topic ``ledger.domain.model:Key.Created``."""
    topic = str(event.get("topic", ""))
    if not topic.startswith(TOPIC_PREFIX):
        return "", ""
    agg, _, kind = topic[len(TOPIC_PREFIX) :].partition(".")
    return agg, kind


def apply_key_event(doc: JSON | None, event: JSON) -> JSON | None:
    """The key document after ``event`` (a decoded Key.* stored event)."""
    _, kind = event_kind(event)
    if kind == "Created":
        material = event.get("material")
        state = "Enabled" if material is not None else "PendingImport"
        materials = []
        if material is not None:
            materials.append(
                {"material_id": material["material_id"], "date": event["timestamp"], "type": None}
            )
        return {
            "key_id": str(event["originator_id"]),
            "arn": event["key_arn"],
            "account": event["call"]["account_id"],
            "created": event["timestamp"],
            "description": event["description"],
            "key_usage": event["key_usage"],
            "key_spec": event["key_spec"],
            "origin": event["origin"],
            "state": state,
            "deletion_date": None,
            "pending_window": None,
            # v1 events (before policies and tags) carry neither: AWS's defaults applied.
            "policy": event.get("policy"),
            "tags": dict(event.get("tags") or {}),
            "rotation_period": None,
            "next_rotation": None,
            "materials": materials,
            "grants": {},
            "deleted": False,
            "updated_seq": 0,
        }
    if doc is None:
        return None
    d = copy.deepcopy(doc)
    if kind == "Enabled":
        d["state"] = "Enabled"
    elif kind == "Disabled":
        d["state"] = "Disabled"
    elif kind == "DescriptionUpdated":
        d["description"] = event["description"]
    elif kind == "Tagged":
        d["tags"].update(event["tags"])
    elif kind == "Untagged":
        for k in event["tag_keys"]:
            d["tags"].pop(k, None)
    elif kind == "PolicyPut":
        d["policy"] = event["policy"]
    elif kind == "RotationEnabled":
        d["rotation_period"] = event["rotation_period_days"]
        d["next_rotation"] = event["next_rotation_date"]
    elif kind == "RotationDisabled":
        d["rotation_period"] = None
        d["next_rotation"] = None
    elif kind == "Rotated":
        d["materials"].append(
            {
                "material_id": event["material"]["material_id"],
                "date": event["timestamp"],
                "type": event["rotation_type"],
            }
        )
        if event["rotation_type"] != "ON_DEMAND":
            d["next_rotation"] = event["next_rotation_date"]
    elif kind == "DeletionScheduled":
        d["state"] = "PendingDeletion"
        d["deletion_date"] = event["deletion_date"]
        d["pending_window"] = event["pending_window_days"]
    elif kind == "DeletionCanceled":
        d["state"] = "Disabled"
        d["deletion_date"] = None
        d["pending_window"] = None
    elif kind == "Deleted":
        d["deleted"] = True
        d["grants"] = {}
    elif kind == "GrantCreated":
        gid = event["grant_id"]
        if gid not in d["grants"]:
            d["grants"][gid] = {**event["grant"], "GrantId": gid, "created": event["timestamp"]}
    elif kind in ("GrantRetired", "GrantRevoked"):
        d["grants"].pop(event["grant_id"], None)
    elif kind == "MaterialImported":
        d["materials"].append(
            {
                "material_id": event["material"]["material_id"],
                "date": event["timestamp"],
                "type": None,
            }
        )
        d["state"] = "Enabled"
        d["expiration_model"] = event["expiration_model"]
        d["valid_to"] = event["valid_to"]
    elif kind == "ImportedMaterialDeleted":
        d["state"] = "PendingImport"
        d["expiration_model"] = None
        d["valid_to"] = None
    return d


def apply_alias_event(doc: JSON | None, event: JSON) -> JSON | None:
    """The alias document after ``event`` (a decoded Alias.* stored event)."""
    _, kind = event_kind(event)
    target = event.get("target_key_id")
    if kind == "Created":
        return {
            "name": event["alias_name"],
            "arn": event["alias_arn"],
            "target": target,
            "created": event["timestamp"],
            "updated": event["timestamp"],
        }
    if doc is None:
        return None
    d = dict(doc)
    if kind == "Recreated":
        d.update(target=target, created=event["timestamp"], updated=event["timestamp"])
    elif kind == "Retargeted":
        d.update(target=target, updated=event["timestamp"])
    elif kind == "Deleted":
        d.update(target=None, updated=event["timestamp"])
    return d


def apply_principal_event(doc: JSON | None, kind: str, event: JSON) -> JSON | None:
    """The principal document (``describe_principal``'s shape, plus ``deleted``) after
    ``event``, a decoded Principal.``kind`` stored event."""
    if kind == "Created":
        from ledger.domain.model import iso

        return {
            "Arn": event["arn"],
            "Name": event["name"],
            "Account": event["account"],
            "Type": event["principal_type"],
            "Enabled": True,
            "AccessKeyIds": [event["access_key_id"]],
            "Policies": [],
            "CreateDate": iso(datetime.fromisoformat(event["timestamp"])),
            "PolicyDocuments": {},
            "deleted": False,
        }
    if doc is None:
        return None
    d = copy.deepcopy(doc)
    if kind == "Disabled":
        d["Enabled"] = False
    elif kind == "Enabled":
        d["Enabled"] = True
    elif kind == "Deleted":
        d.update(Enabled=False, deleted=True)
    elif kind == "PolicyAttached":
        d["PolicyDocuments"][event["policy_name"]] = event["policy"]
    elif kind == "PolicyDetached":
        d["PolicyDocuments"].pop(event["policy_name"], None)
    d["Policies"] = sorted(d["PolicyDocuments"])
    return d


def drop_alias(doc: JSON, timestamp: str) -> JSON:
    """The alias document after the key it names was deleted."""
    return {**doc, "target": None, "updated": timestamp}


def default_policy(account: str) -> str:
    from ledger.domain.model import default_key_policy

    return default_key_policy(account)


def key_metadata(doc: JSON) -> JSON:
    """DescribeKey's KeyMetadata for a key document (same shape as the service's)."""
    md: JSON = {
        "AWSAccountId": doc["account"],
        "KeyId": doc["key_id"],
        "Arn": doc["arn"],
        "CreationDate": epoch(doc["created"]),
        "Enabled": doc["state"] == "Enabled",
        "Description": doc["description"],
        "KeyUsage": doc["key_usage"],
        "KeyState": doc["state"],
        "Origin": doc["origin"],
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": doc["key_spec"],
        "KeySpec": doc["key_spec"],
        **key_algorithms(doc["key_spec"], doc["key_usage"]),
        "MultiRegion": False,
    }
    if doc["deletion_date"] is not None:
        md["DeletionDate"] = epoch(doc["deletion_date"])
        md["PendingDeletionWindowInDays"] = doc["pending_window"]
    if doc["materials"]:
        md["CurrentKeyMaterialId"] = doc["materials"][-1]["material_id"]
    if doc.get("expiration_model"):
        md["ExpirationModel"] = doc["expiration_model"]
        if doc.get("valid_to"):
            md["ValidTo"] = epoch(doc["valid_to"])
    return md


def alias_entry(doc: JSON) -> JSON:
    return {
        "AliasName": doc["name"],
        "AliasArn": doc["arn"],
        "TargetKeyId": doc["target"],
        "CreationDate": epoch(doc["created"]),
        "LastUpdatedDate": epoch(doc["updated"]),
    }


def grant_entries(doc: JSON) -> list[JSON]:
    """ListGrants entries, oldest first (same shape as the service's)."""
    out = []
    for gid, g in sorted(doc["grants"].items(), key=lambda kv: (kv[1]["created"], kv[0])):
        entry = {k: v for k, v in g.items() if k != "created"}
        entry["GrantId"] = gid
        entry["CreationDate"] = epoch(g["created"])
        out.append(entry)
    return out


def key_policy(doc: JSON) -> str:
    policy = doc["policy"]
    return policy if policy is not None else default_policy(doc["account"])


@dataclass
class LedgerState:
    """Every key, alias and principal document, folded from the log in memory (point
    in time)."""

    keys: dict[str, JSON] = field(default_factory=dict)  # by key id
    aliases: dict[str, JSON] = field(default_factory=dict)  # by alias stream id
    principals: dict[str, JSON] = field(default_factory=dict)  # by stream id
    seq: int = 0
    time: str | None = None

    def apply(self, seq: int, event: JSON) -> None:
        agg, _ = event_kind(event)
        oid = str(event.get("originator_id", ""))
        if agg == "Key":
            doc = apply_key_event(self.keys.get(oid), event)
            if doc is not None:
                self.keys[oid] = doc
                if doc["deleted"]:  # AWS deletes a key's aliases with the key
                    for aid, alias in self.aliases.items():
                        if alias["target"] == oid:
                            self.aliases[aid] = drop_alias(alias, event["timestamp"])
        elif agg == "Alias":
            doc = apply_alias_event(self.aliases.get(oid), event)
            if doc is not None:
                self.aliases[oid] = doc
        elif str(event.get("topic", "")).startswith(PRINCIPAL_PREFIX):
            kind = str(event["topic"])[len(PRINCIPAL_PREFIX) :]
            pdoc = apply_principal_event(self.principals.get(oid), kind, event)
            if pdoc is not None:
                self.principals[oid] = pdoc
        self.seq = seq
        self.time = event.get("timestamp")
