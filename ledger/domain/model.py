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
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from ledger.errors import KMSInvalidStateError
from ledger.keystore.port import MaterialRef

JSON = dict[str, Any]

ENABLED = "Enabled"
DISABLED = "Disabled"


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

    def as_dict(self) -> JSON:
        return asdict(self)


def material_to_json(material: MaterialRef) -> JSON:
    return {
        "material_id": material.material_id,
        "wrapped": base64.b64encode(material.wrapped).decode("ascii"),
    }


def material_from_json(data: JSON) -> MaterialRef:
    return MaterialRef(
        material_id=str(data["material_id"]), wrapped=base64.b64decode(data["wrapped"])
    )


def cloudtrail_date(ts: datetime) -> str:
    """The date format CloudTrail uses inside ``responseElements`` (e.g. CreateKey)."""
    hour = ts.hour % 12 or 12
    ampm = "AM" if ts.hour < 12 else "PM"
    return f"{ts:%b} {ts.day}, {ts.year}, {hour}:{ts:%M:%S} {ampm}"


class Key(Aggregate):
    """One KMS key: its metadata, state and backing-key versions.

    Raises KMSInvalidStateError from commands the key's state does not allow.
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

    class Event(Aggregate.Event):
        call: JSON
        key_arn: str
        request: JSON
        response: JSON | None
        additional: JSON | None
        read_only: bool

    class Created(Event, Aggregate.Created):
        key_id: str
        description: str
        key_spec: str
        key_usage: str
        origin: str
        material: JSON

        def __repr__(self) -> str:
            return (
                f"Key.Created(originator_id={self.originator_id!r}, key_arn={self.key_arn!r}, "
                f"material_id={self.material.get('material_id')!r}, wrapped=<redacted>)"
            )

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.key_id = self.key_id
            aggregate.arn = self.key_arn
            aggregate.description = self.description
            aggregate.key_spec = self.key_spec
            aggregate.key_usage = self.key_usage
            aggregate.origin = self.origin
            aggregate.key_state = ENABLED
            aggregate.materials = [self.material]

    class Enabled(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.key_state = ENABLED

    class Disabled(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Key)
            aggregate.key_state = DISABLED

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
        material: MaterialRef,
        request: JSON,
    ) -> Key:
        metadata = {
            "AWSAccountId": call.account_id,
            "keyId": str(key_id),
            "arn": arn,
            "creationDate": cloudtrail_date(timestamp),
            "enabled": True,
            "description": description,
            "keyUsage": key_usage,
            "keyState": ENABLED,
            "origin": origin,
            "keyManager": "CUSTOMER",
            "customerMasterKeySpec": key_spec,
            "keySpec": key_spec,
            "encryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
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
            additional={"keyMaterialId": material.material_id},
            read_only=False,
            key_id=str(key_id),
            description=description,
            key_spec=key_spec,
            key_usage=key_usage,
            origin=origin,
            material=material_to_json(material),
        )

    def __repr__(self) -> str:
        ids = [m.get("material_id") for m in self.materials]
        return (
            f"Key(id={self.id!r}, version={self.version}, arn={self.arn!r}, "
            f"key_state={self.key_state!r}, material_ids={ids!r})"
        )

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

    def material_version(self, version: int) -> MaterialRef:
        """The backing key of a given version; raises KeyError when unknown."""
        if not 1 <= version <= len(self.materials):
            raise KeyError(version)
        return material_from_json(self.materials[version - 1])

    def enable(self, *, call: CallContext, timestamp: datetime, request: JSON) -> None:
        self._check_not_pending()
        self.trigger_event(
            self.Enabled,
            timestamp=timestamp,
            call=call.as_dict(),
            key_arn=self.arn,
            request=request,
            response=None,
            additional=None,
            read_only=False,
        )

    def disable(self, *, call: CallContext, timestamp: datetime, request: JSON) -> None:
        self._check_not_pending()
        self.trigger_event(
            self.Disabled,
            timestamp=timestamp,
            call=call.as_dict(),
            key_arn=self.arn,
            request=request,
            response=None,
            additional=None,
            read_only=False,
        )

    def _check_not_pending(self) -> None:
        if self.key_state not in (ENABLED, DISABLED):
            raise KMSInvalidStateError(f"{self.arn} is pending deletion.")


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
