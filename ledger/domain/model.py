"""Key ledger aggregates and their events.

Every event carries what an audit record needs (``call``, ``key_arn``, ``request``,
``response``, ``additional``, ``read_only``) as plain JSON values, so the stored
canonical bytes are the whole truth. Timestamps, ids and wrapped material come in as
arguments; nothing here reads the clock, the RNG or the HSM.

Security: ``request``/``response``/``additional`` must never hold plaintext,
ciphertext blobs or key material; the only material an event holds is the
HSM-wrapped blob in ``Key.Created.material``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from ledger.domain.key_specs import camel, key_algorithms
from ledger.domain.key_states import (
    DISABLED,
    ENABLED,
    PENDING_DELETION,
    PENDING_IMPORT,
    check_key_state,
)
from ledger.errors import (
    AlreadyExistsError,
    KMSInvalidStateError,
    LimitExceededError,
    NotFoundError,
    TagError,
    UnsupportedOperationError,
)
from ledger.keystore.port import MaterialRef

JSON = dict[str, Any]

MAX_TAGS = 50
ALIAS_NAMESPACE = UUID("6b6c6561-6c69-4173-8000-6b65796c6564")  # fixed: alias stream ids


@dataclass(frozen=True)
class CallContext:
    """Who called which operation, from where; recorded on every event."""

    operation: str
    request_id: str
    principal: str
    region: str
    account_id: str
    source_ip: str | None = None
    user_agent: str | None = None
    service_initiated: bool = False
    access_key_id: str | None = None

    def as_dict(self) -> JSON:
        out = dict(vars(self))  # every field is a plain value: no deep copy needed
        if out["access_key_id"] is None:  # absent, as in records made before principals
            del out["access_key_id"]
        return out


def material_to_json(material: MaterialRef, public_key: bytes | None = None) -> JSON:
    """The stored form of a backing key; an asymmetric key's DER public key rides along."""
    out: JSON = {
        "material_id": material.material_id,
        "wrapped": base64.b64encode(material.wrapped).decode("ascii"),
    }
    if material.kek is not None:
        out["kek"] = material.kek
    if material.kind != "AES":
        out["kind"] = material.kind
    if public_key is not None:
        out["public_key"] = base64.b64encode(public_key).decode("ascii")
    return out


def material_from_json(data: JSON) -> MaterialRef:
    return MaterialRef(
        material_id=str(data["material_id"]),
        wrapped=base64.b64decode(data["wrapped"]),
        kek=data.get("kek"),
        kind=str(data.get("kind", "AES")),
    )


def kek_label(key_id: UUID | str) -> str:
    """The label of a KMS key's own key-encryption key in the HSM."""
    return f"keyledger-kek-{key_id}"


def cloudtrail_date(ts: datetime) -> str:
    """The date format CloudTrail uses inside ``responseElements`` (e.g. CreateKey)."""
    hour = ts.hour % 12 or 12
    ampm = "AM" if ts.hour < 12 else "PM"
    return f"{ts:%b} {ts.day}, {ts.year}, {hour}:{ts:%M:%S} {ampm}"


def default_key_policy(account_id: str) -> str:
    """AWS's default key policy: the account root may use every KMS action."""
    policy = {
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    return json.dumps(policy, indent=2)


def iso(ts: datetime) -> str:
    return ts.isoformat()


class Key(Aggregate):
    """One KMS key: metadata, state, backing-key versions, tags, policy, rotation,
    deletion schedule and grants.

    Commands check AWS's key state table first and raise DisabledError or
    KMSInvalidStateError (see ``key_states``); parameter validation is the service's.
    """

    def __init__(self) -> None:
        self.key_id = ""
        self.arn = ""
        self.description = ""
        self.key_spec = ""
        self.key_usage = ""
        self.origin = ""
        self.key_state = ENABLED
        self.materials: list[JSON] = []
        self.tags: dict[str, str] = {}
        self.policy = ""
        self.rotation_period_days: int | None = None
        self.next_rotation_date: str | None = None
        self.on_demand_rotations = 0
        self.deletion_date: str | None = None
        self.pending_window_days: int | None = None
        self.deleted = False
        self.grants: dict[str, JSON] = {}
        self.import_params: JSON | None = None
        self.expiration_model: str | None = None
        self.valid_to: str | None = None

    class Event(Aggregate.Event):
        call: JSON
        key_arn: str
        request: JSON
        response: JSON | None
        additional: JSON | None
        read_only: bool

    class Created(Event, Aggregate.Created):
        class_version = 2
        key_id: str
        description: str
        key_spec: str
        key_usage: str
        origin: str
        material: JSON | None
        policy: str
        tags: dict[str, str]

        def __repr__(self) -> str:
            mid = (self.material or {}).get("material_id")
            return (
                f"Key.Created(originator_id={self.originator_id!r}, key_arn={self.key_arn!r}, "
                f"material_id={mid!r}, wrapped=<redacted>)"
            )

        @staticmethod
        def upcast_v1_v2(state: JSON) -> None:
            """v1 (issue 2) had no policy and no tags: AWS's defaults apply."""
            state["policy"] = default_key_policy(state["call"]["account_id"])
            state["tags"] = {}

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.key_id = self.key_id
            aggregate.arn = self.key_arn
            aggregate.description = self.description
            aggregate.key_spec = self.key_spec
            aggregate.key_usage = self.key_usage
            aggregate.origin = self.origin
            aggregate.policy = self.policy
            aggregate.tags = dict(self.tags)
            if self.material is None:
                aggregate.key_state = PENDING_IMPORT
                aggregate.materials = []
            else:
                aggregate.key_state = ENABLED
                aggregate.materials = [
                    {**self.material, "rotation_date": iso(self.timestamp), "rotation_type": None}
                ]

    class Enabled(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.key_state = ENABLED

    class Disabled(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.key_state = DISABLED

    class DescriptionUpdated(Event):
        description: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.description = self.description

    class Tagged(Event):
        tags: dict[str, str]

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.tags.update(self.tags)

    class Untagged(Event):
        tag_keys: list[str]

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            for k in self.tag_keys:
                aggregate.tags.pop(k, None)

    class PolicyPut(Event):
        policy_name: str
        policy: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.policy = self.policy

    class RotationEnabled(Event):
        rotation_period_days: int
        next_rotation_date: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.rotation_period_days = self.rotation_period_days
            aggregate.next_rotation_date = self.next_rotation_date

    class RotationDisabled(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.rotation_period_days = None
            aggregate.next_rotation_date = None

    class Rotated(Event):
        material: JSON
        rotation_type: str
        next_rotation_date: str | None

        def __repr__(self) -> str:
            return (
                f"Key.Rotated(originator_id={self.originator_id!r}, "
                f"material_id={self.material.get('material_id')!r}, wrapped=<redacted>)"
            )

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.materials.append(
                {
                    **self.material,
                    "rotation_date": iso(self.timestamp),
                    "rotation_type": self.rotation_type,
                }
            )
            if self.rotation_type == "ON_DEMAND":
                aggregate.on_demand_rotations += 1
            else:
                aggregate.next_rotation_date = self.next_rotation_date

    class DeletionScheduled(Event):
        deletion_date: str
        pending_window_days: int

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.key_state = PENDING_DELETION
            aggregate.deletion_date = self.deletion_date
            aggregate.pending_window_days = self.pending_window_days

    class DeletionCanceled(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.key_state = DISABLED
            aggregate.deletion_date = None
            aggregate.pending_window_days = None

    class Deleted(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.deleted = True
            aggregate.grants = {}

    class ImportParametersIssued(Event):
        wrapping: JSON
        wrapping_algorithm: str
        wrapping_key_spec: str
        parameters_id: str
        token_digest: str
        parameters_valid_to: str

        def __repr__(self) -> str:
            oid = self.originator_id
            return f"Key.ImportParametersIssued(originator_id={oid!r}, wrapped=<redacted>)"

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.import_params = {
                "wrapping": self.wrapping,
                "wrapping_algorithm": self.wrapping_algorithm,
                "wrapping_key_spec": self.wrapping_key_spec,
                "parameters_id": self.parameters_id,
                "token_digest": self.token_digest,
                "valid_to": self.parameters_valid_to,
            }

    class MaterialImported(Event):
        material: JSON
        expiration_model: str
        valid_to: str | None

        def __repr__(self) -> str:
            return (
                f"Key.MaterialImported(originator_id={self.originator_id!r}, "
                f"material_id={self.material.get('material_id')!r}, wrapped=<redacted>)"
            )

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.materials.append(
                {**self.material, "rotation_date": iso(self.timestamp), "rotation_type": None}
            )
            aggregate.key_state = ENABLED
            aggregate.expiration_model = self.expiration_model
            aggregate.valid_to = self.valid_to
            aggregate.import_params = None

    class ImportedMaterialDeleted(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.key_state = PENDING_IMPORT
            aggregate.valid_to = None
            aggregate.expiration_model = None

    class GrantCreated(Event):
        grant_id: str
        grant: JSON
        token_digest: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            existing = aggregate.grants.get(self.grant_id)
            if existing is not None:  # a same-name retry: same grant, one more token
                existing["token_digests"].append(self.token_digest)
                return
            aggregate.grants[self.grant_id] = {
                "grant": self.grant,
                "token_digests": [self.token_digest],
                "creation_date": iso(self.timestamp),
            }

    class GrantRetired(Event):
        grant_id: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.grants.pop(self.grant_id, None)

    class GrantRevoked(Event):
        grant_id: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.grants.pop(self.grant_id, None)

    @classmethod
    def create(
        cls,
        *,
        key_id: UUID,
        arn: str,
        call: CallContext,
        timestamp: datetime,
        description: str,
        key_spec: str,
        key_usage: str,
        origin: str,
        material: MaterialRef | None,
        request: JSON,
        policy: str | None = None,
        tags: dict[str, str] | None = None,
        public_key: bytes | None = None,
    ) -> Key:
        state = ENABLED if material is not None else PENDING_IMPORT
        metadata = {
            "AWSAccountId": call.account_id,
            "keyId": str(key_id),
            "arn": arn,
            "creationDate": cloudtrail_date(timestamp),
            "enabled": state == ENABLED,
            "description": description,
            "keyUsage": key_usage,
            "keyState": state,
            "origin": origin,
            "keyManager": "CUSTOMER",
            "customerMasterKeySpec": key_spec,
            "keySpec": key_spec,
            **camel(key_algorithms(key_spec, key_usage)),
            "multiRegion": False,
        }
        return cls._create(
            cls.Created,
            id=key_id,
            timestamp=timestamp,
            call=call.as_dict(),
            key_arn=arn,
            request=request,
            response={"keyMetadata": metadata},
            additional=None if material is None else {"keyMaterialId": material.material_id},
            read_only=False,
            key_id=str(key_id),
            description=description,
            key_spec=key_spec,
            key_usage=key_usage,
            origin=origin,
            material=None if material is None else material_to_json(material, public_key),
            policy=policy if policy is not None else default_key_policy(call.account_id),
            tags=dict(tags or {}),
        )

    def __repr__(self) -> str:
        ids = [m.get("material_id") for m in self.materials]
        return (
            f"Key(id={self.id!r}, version={self.version}, arn={self.arn!r}, "
            f"key_state={self.key_state!r}, material_ids={ids!r})"
        )

    # ---------------------------------------------------------------- queries

    @property
    def enabled(self) -> bool:
        return self.key_state == ENABLED

    @property
    def current_material(self) -> MaterialRef:
        return material_from_json(self.materials[-1])

    @property
    def version_number(self) -> int:
        """The 1-based backing-key version used for new ciphertexts."""
        return len(self.materials)

    @property
    def current_material_id(self) -> str | None:
        return str(self.materials[-1]["material_id"]) if self.materials else None

    @property
    def public_key(self) -> bytes | None:
        """DER SubjectPublicKeyInfo of an asymmetric key (None for other keys)."""
        if not self.materials or "public_key" not in self.materials[-1]:
            return None
        return base64.b64decode(self.materials[-1]["public_key"])

    def material_version(self, version: int) -> MaterialRef:
        """The backing key of a given version; raises KeyError when unknown."""
        if not 1 <= version <= len(self.materials):
            raise KeyError(version)
        return material_from_json(self.materials[version - 1])

    def keks(self) -> list[str]:
        """The labels of the KEKs this key's material is wrapped under."""
        return sorted({str(m["kek"]) for m in self.materials if m.get("kek")})

    def rotations(self) -> list[JSON]:
        """Every rotation (not the initial material), oldest first."""
        return [m for m in self.materials if m.get("rotation_type")]

    def check(self, operation: str) -> None:
        """Raise what AWS raises for ``operation`` in this key's state."""
        check_key_state(operation, self.key_state, self.arn)

    def rotation_due(self, now: datetime) -> bool:
        """Automatic rotation is due: enabled, schedule passed, key usable (AWS does
        not rotate disabled or pending-deletion keys)."""
        return (
            self.key_state == ENABLED
            and self.next_rotation_date is not None
            and datetime.fromisoformat(self.next_rotation_date) <= now
        )

    def deletion_due(self, now: datetime) -> bool:
        return (
            self.key_state == PENDING_DELETION
            and not self.deleted
            and self.deletion_date is not None
            and datetime.fromisoformat(self.deletion_date) <= now
        )

    # ---------------------------------------------------------------- commands

    def _emit(
        self,
        event_class: type[Key.Event],
        *,
        call: CallContext,
        timestamp: datetime,
        request: JSON,
        response: JSON | None = None,
        additional: JSON | None = None,
        **fields: Any,
    ) -> None:
        self.trigger_event(
            event_class,
            timestamp=timestamp,
            call=call.as_dict(),
            key_arn=self.arn,
            request=request,
            response=response,
            additional=additional,
            read_only=False,
            **fields,
        )

    def enable(self, *, call: CallContext, timestamp: datetime, request: JSON) -> None:
        self.check("EnableKey")
        self._emit(self.Enabled, call=call, timestamp=timestamp, request=request)

    def disable(self, *, call: CallContext, timestamp: datetime, request: JSON) -> None:
        self.check("DisableKey")
        self._emit(self.Disabled, call=call, timestamp=timestamp, request=request)

    def update_description(
        self, *, call: CallContext, timestamp: datetime, request: JSON, description: str
    ) -> None:
        self.check("UpdateKeyDescription")
        self._emit(
            self.DescriptionUpdated,
            call=call,
            timestamp=timestamp,
            request=request,
            description=description,
        )

    def tag(
        self, *, call: CallContext, timestamp: datetime, request: JSON, tags: dict[str, str]
    ) -> None:
        """TagResource; raises TagException when the result would exceed 50 tags."""
        self.check("TagResource")
        if len(set(self.tags) | set(tags)) > MAX_TAGS:
            raise TagError("Too many tags")
        self._emit(self.Tagged, call=call, timestamp=timestamp, request=request, tags=tags)

    def untag(
        self, *, call: CallContext, timestamp: datetime, request: JSON, tag_keys: list[str]
    ) -> None:
        self.check("UntagResource")
        self._emit(
            self.Untagged, call=call, timestamp=timestamp, request=request, tag_keys=tag_keys
        )

    def put_policy(
        self,
        *,
        call: CallContext,
        timestamp: datetime,
        request: JSON,
        policy_name: str,
        policy: str,
    ) -> None:
        self.check("PutKeyPolicy")
        self._emit(
            self.PolicyPut,
            call=call,
            timestamp=timestamp,
            request=request,
            policy_name=policy_name,
            policy=policy,
        )

    def enable_rotation(
        self, *, call: CallContext, timestamp: datetime, request: JSON, period_days: int
    ) -> None:
        self.check("EnableKeyRotation")
        self._check_rotatable()
        nxt = iso(timestamp + timedelta(days=period_days))
        self._emit(
            self.RotationEnabled,
            call=call,
            timestamp=timestamp,
            request=request,
            rotation_period_days=period_days,
            next_rotation_date=nxt,
        )

    def disable_rotation(self, *, call: CallContext, timestamp: datetime, request: JSON) -> None:
        self.check("DisableKeyRotation")
        self._check_rotatable()
        self._emit(self.RotationDisabled, call=call, timestamp=timestamp, request=request)

    def rotate(
        self,
        *,
        call: CallContext,
        timestamp: datetime,
        request: JSON,
        material: MaterialRef,
        rotation_type: str,
        on_demand_limit: int,
    ) -> None:
        """RotateKeyOnDemand (``ON_DEMAND``) or the automatic rotation (``AUTOMATIC``).

        Raises LimitExceededError past ``on_demand_limit`` on-demand rotations.
        """
        if rotation_type == "ON_DEMAND":
            self.check_on_demand_rotation(on_demand_limit)
            nxt = self.next_rotation_date
        else:
            assert self.rotation_period_days is not None
            nxt = iso(timestamp + timedelta(days=self.rotation_period_days))
        self._emit(
            self.Rotated,
            call=call,
            timestamp=timestamp,
            request=request,
            response={"keyId": self.arn} if rotation_type == "ON_DEMAND" else None,
            additional=(
                {"keyMaterialId": material.material_id, "rotationType": rotation_type}
                if rotation_type == "ON_DEMAND"
                else {  # AWS's serviceEventDetails for RotateKey
                    "rotationType": rotation_type,
                    "keyOrigin": self.origin,
                    "previousKeyMaterialId": self.current_material_id,
                    "currentKeyMaterialId": material.material_id,
                }
            ),
            material=material_to_json(material),
            rotation_type=rotation_type,
            next_rotation_date=nxt,
        )

    def check_on_demand_rotation(self, limit: int) -> None:
        """Raise what AWS raises for RotateKeyOnDemand now (state, key type, limit)."""
        self.check("RotateKeyOnDemand")
        self._check_rotatable()
        if self.on_demand_rotations >= limit:
            raise LimitExceededError(
                "The on-demand rotations limit has been reached for the given keyId. "
                f"No more on-demand rotations can be performed for this key: {self.arn}"
            )

    def _check_rotatable(self) -> None:
        if self.key_spec != "SYMMETRIC_DEFAULT" or self.origin != "AWS_KMS":
            raise UnsupportedOperationError(
                f"{self.arn} origin is {self.origin} which is not valid for this operation."
                if self.origin != "AWS_KMS"
                else f"{self.arn} key spec {self.key_spec} is not valid for this operation."
            )

    def schedule_deletion(
        self, *, call: CallContext, timestamp: datetime, request: JSON, window_days: int
    ) -> None:
        self.check("ScheduleKeyDeletion")
        deletion = timestamp + timedelta(days=window_days)
        self._emit(
            self.DeletionScheduled,
            call=call,
            timestamp=timestamp,
            request=request,
            response={
                "keyId": self.arn,
                "deletionDate": cloudtrail_date(deletion),
                "keyState": PENDING_DELETION,
                "pendingWindowInDays": window_days,
            },
            deletion_date=iso(deletion),
            pending_window_days=window_days,
        )

    def cancel_deletion(self, *, call: CallContext, timestamp: datetime, request: JSON) -> None:
        self.check("CancelKeyDeletion")
        self._emit(
            self.DeletionCanceled,
            call=call,
            timestamp=timestamp,
            request=request,
            response={"keyId": self.arn},
        )

    def delete(self, *, call: CallContext, timestamp: datetime) -> None:
        """The service event at the end of the waiting period."""
        if not self.deletion_due(timestamp):
            raise KMSInvalidStateError(f"{self.arn} is not pending deletion.")
        self._emit(
            self.Deleted,
            call=call,
            timestamp=timestamp,
            request={"keyId": self.key_id},
            additional={"keyMaterialIds": [m["material_id"] for m in self.materials]},
        )

    # ---------------------------------------------------------------- imports

    def issue_import_parameters(
        self,
        *,
        call: CallContext,
        timestamp: datetime,
        request: JSON,
        wrapping: MaterialRef,
        wrapping_algorithm: str,
        wrapping_key_spec: str,
        parameters_id: str,
        token_digest: str,
    ) -> None:
        """GetParametersForImport: a wrapping key and a token valid for 24 hours."""
        self.check("GetParametersForImport")
        self._check_external()
        valid_to = timestamp + timedelta(hours=24)
        self._emit(
            self.ImportParametersIssued,
            call=call,
            timestamp=timestamp,
            request=request,
            response={"keyId": self.arn, "parametersValidTo": cloudtrail_date(valid_to)},
            wrapping=material_to_json(wrapping),
            wrapping_algorithm=wrapping_algorithm,
            wrapping_key_spec=wrapping_key_spec,
            parameters_id=parameters_id,
            token_digest=token_digest,
            parameters_valid_to=iso(valid_to),
        )

    def import_material(
        self,
        *,
        call: CallContext,
        timestamp: datetime,
        request: JSON,
        material: MaterialRef,
        expiration_model: str,
        valid_to: datetime | None,
    ) -> None:
        """ImportKeyMaterial: the key becomes Enabled with the imported material."""
        self._emit(
            self.MaterialImported,
            call=call,
            timestamp=timestamp,
            request=request,
            additional={"keyMaterialId": material.material_id},
            material=material_to_json(material),
            expiration_model=expiration_model,
            valid_to=None if valid_to is None else iso(valid_to),
        )

    def delete_imported_material(
        self, *, call: CallContext, timestamp: datetime, request: JSON
    ) -> None:
        """DeleteImportedKeyMaterial (or its expiry, a service event)."""
        if not call.service_initiated:
            self.check("DeleteImportedKeyMaterial")
        self._check_external()
        if not self.materials or self.key_state == PENDING_IMPORT:
            raise KMSInvalidStateError(f"{self.arn} is pending import.")
        self._emit(
            self.ImportedMaterialDeleted,
            call=call,
            timestamp=timestamp,
            request=request,
            additional={"keyMaterialId": self.current_material_id},
        )

    def _check_external(self) -> None:
        if self.origin != "EXTERNAL":
            raise UnsupportedOperationError(
                f"{self.arn} origin is {self.origin} which is not valid for this operation."
            )

    def material_expiry_due(self, now: datetime) -> bool:
        return (
            self.expiration_model == "KEY_MATERIAL_EXPIRES"
            and self.valid_to is not None
            and self.key_state in (ENABLED, DISABLED)
            and datetime.fromisoformat(self.valid_to) <= now
        )

    def create_grant(
        self,
        *,
        call: CallContext,
        timestamp: datetime,
        request: JSON,
        grant_id: str,
        grant: JSON,
        token_digest: str,
    ) -> None:
        self.check("CreateGrant")
        self._emit(
            self.GrantCreated,
            call=call,
            timestamp=timestamp,
            request=request,
            response={"grantId": grant_id},
            grant_id=grant_id,
            grant=grant,
            token_digest=token_digest,
        )

    def end_grant(
        self, *, call: CallContext, timestamp: datetime, request: JSON, grant_id: str, revoke: bool
    ) -> None:
        """RetireGrant or RevokeGrant; raises NotFoundError for an unknown grant id."""
        self.check("RevokeGrant" if revoke else "RetireGrant")
        if grant_id not in self.grants:
            raise NotFoundError(f"Grant ID {grant_id} not found")
        self._emit(
            self.GrantRevoked if revoke else self.GrantRetired,
            call=call,
            timestamp=timestamp,
            request=request,
            grant_id=grant_id,
        )


class Alias(Aggregate):
    """One alias name in an account and region; its target over time is its history.

    The stream id is derived from the alias ARN, so re-creating a deleted alias
    continues the same stream.
    """

    def __init__(self) -> None:
        self.alias_name = ""
        self.alias_arn = ""
        self.target_key_id: str | None = None
        self.created_on_ts: str | None = None

    class Event(Aggregate.Event):
        call: JSON
        key_arn: str
        request: JSON
        response: JSON | None
        additional: JSON | None
        read_only: bool

    class Created(Event, Aggregate.Created):
        alias_name: str
        alias_arn: str
        target_key_id: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Alias)
            aggregate.alias_name = self.alias_name
            aggregate.alias_arn = self.alias_arn
            aggregate.target_key_id = self.target_key_id
            aggregate.created_on_ts = iso(self.timestamp)

    class Recreated(Event):
        target_key_id: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Alias)
            aggregate.target_key_id = self.target_key_id
            aggregate.created_on_ts = iso(self.timestamp)

    class Retargeted(Event):
        target_key_id: str
        previous_key_id: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Alias)
            aggregate.target_key_id = self.target_key_id

    class Deleted(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Alias)
            aggregate.target_key_id = None

    @staticmethod
    def stream_id(alias_arn: str) -> UUID:
        return uuid5(ALIAS_NAMESPACE, alias_arn)

    @classmethod
    def create(
        cls,
        *,
        call: CallContext,
        timestamp: datetime,
        alias_name: str,
        alias_arn: str,
        target_key_id: str,
        key_arn: str,
        request: JSON,
    ) -> Alias:
        return cls._create(
            cls.Created,
            id=cls.stream_id(alias_arn),
            timestamp=timestamp,
            call=call.as_dict(),
            key_arn=key_arn,
            request=request,
            response=None,
            additional=None,
            read_only=False,
            alias_name=alias_name,
            alias_arn=alias_arn,
            target_key_id=target_key_id,
        )

    @property
    def exists(self) -> bool:
        return self.target_key_id is not None

    def _emit(self, event_class: type[Alias.Event], *, call: CallContext, timestamp: datetime,
              key_arn: str, request: JSON, **fields: Any) -> None:  # fmt: skip
        self.trigger_event(
            event_class,
            timestamp=timestamp,
            call=call.as_dict(),
            key_arn=key_arn,
            request=request,
            response=None,
            additional=None,
            read_only=False,
            **fields,
        )

    def recreate(
        self, *, call: CallContext, timestamp: datetime, target_key_id: str, key_arn: str,
        request: JSON, target_deleted: bool = False,
    ) -> None:  # fmt: skip
        """Create the alias again: allowed when it was deleted, or when the key it named
        was deleted (AWS deletes a key's aliases with the key)."""
        if self.exists and not target_deleted:
            raise AlreadyExistsError(f"An alias with the name {self.alias_arn} already exists")
        self._emit(self.Recreated, call=call, timestamp=timestamp, key_arn=key_arn,
                   request=request, target_key_id=target_key_id)  # fmt: skip

    def retarget(
        self, *, call: CallContext, timestamp: datetime, target_key_id: str, key_arn: str,
        request: JSON,
    ) -> None:  # fmt: skip
        assert self.target_key_id is not None
        self._emit(self.Retargeted, call=call, timestamp=timestamp, key_arn=key_arn,
                   request=request, target_key_id=target_key_id,
                   previous_key_id=self.target_key_id)  # fmt: skip

    def delete(
        self, *, call: CallContext, timestamp: datetime, key_arn: str, request: JSON
    ) -> None:
        self._emit(self.Deleted, call=call, timestamp=timestamp, key_arn=key_arn, request=request)


class ApiCall(Aggregate):
    """A single-event stream per recorded call that changes no key state.

    ``Succeeded`` records each cryptographic use; ``Failed`` records every denied or
    failed attempt of any operation with its AWS error code.
    """

    def __init__(self) -> None:
        pass

    class Recorded(Aggregate.Created):
        call: JSON
        key_arn: str | None
        request: JSON
        response: JSON | None
        additional: JSON | None
        read_only: bool

    class Succeeded(Recorded):
        pass

    class Failed(Recorded):
        error_code: str
        error_message: str

    @classmethod
    def succeeded(
        cls,
        *,
        call: CallContext,
        timestamp: datetime,
        key_arn: str | None,
        request: JSON,
        additional: JSON | None = None,
        read_only: bool = True,
    ) -> ApiCall:
        return cls._create(
            cls.Succeeded,
            id=UUID(call.request_id),
            timestamp=timestamp,
            call=call.as_dict(),
            key_arn=key_arn,
            request=request,
            response=None,
            additional=additional,
            read_only=read_only,
        )

    @classmethod
    def failed(
        cls,
        *,
        call: CallContext,
        timestamp: datetime,
        key_arn: str | None,
        request: JSON,
        error_code: str,
        error_message: str,
        read_only: bool,
    ) -> ApiCall:
        return cls._create(
            cls.Failed,
            id=UUID(call.request_id),
            timestamp=timestamp,
            call=call.as_dict(),
            key_arn=key_arn,
            request=request,
            response=None,
            additional=None,
            read_only=read_only,
            error_code=error_code,
            error_message=error_message,
        )
