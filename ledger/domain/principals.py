"""Principals (IAM-style users and roles) and their access keys, as ledger aggregates.

A principal is ``arn:aws:iam::<account>:user/<name>`` or ``...:role/<name>``; its
identity policies are part of its history. An access key is its own stream (looked up
by access key id at every request); its secret is stored only sealed: AES-GCM under a
data key that is itself wrapped under the HSM domain key.

Security: events never hold a secret access key, only the sealed form.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from ledger.domain.model import CallContext, iso
from ledger.errors import AlreadyExistsError, NotFoundError, ValidationError

JSON = dict[str, Any]

PRINCIPAL_NAMESPACE = UUID("6b6c7072-696e-4369-8000-6b65796c6564")  # fixed: stream ids
PRINCIPAL_TYPES = ("user", "role")
NAME_RE = re.compile(r"^[\w+=,.@-]{1,64}$")
ACCOUNT_RE = re.compile(r"^\d{12}$")
POLICY_NAME_RE = re.compile(r"^[\w+=,.@-]{1,128}$")
ROOT_RE = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):root$")
PRINCIPAL_ARN_RE = re.compile(r"^arn:aws[a-z-]*:(?:iam|sts)::(\d{12}):(.+)$")


def principal_arn(account: str, principal_type: str, name: str) -> str:
    return f"arn:aws:iam::{account}:{principal_type}/{name}"


def root_arn(account: str) -> str:
    return f"arn:aws:iam::{account}:root"


def account_of(arn: str) -> str | None:
    """The account of an IAM/STS principal ARN, or None when it is not one."""
    m = PRINCIPAL_ARN_RE.match(arn)
    return m.group(1) if m else None


def is_root(arn: str) -> bool:
    return ROOT_RE.match(arn) is not None


def check_principal_input(name: str, account: str, principal_type: str) -> None:
    """Raise ValidationError for an IAM-invalid name, account id or type."""
    if not NAME_RE.match(name):
        raise ValidationError(
            f"1 validation error detected: Value '{name[:64]}' at 'userName' failed to satisfy "
            r"constraint: Member must satisfy regular expression pattern: [\w+=,.@-]+"
        )
    if not ACCOUNT_RE.match(account):
        raise ValidationError("The account id must be 12 digits.")
    if principal_type not in PRINCIPAL_TYPES:
        raise ValidationError("The principal type must be user or role.")


class Principal(Aggregate):
    """One user or role; identity policies attached by name."""

    def __init__(self) -> None:
        self.arn = ""
        self.name = ""
        self.account = ""
        self.principal_type = "user"
        self.enabled = True
        self.deleted = False
        self.policies: dict[str, str] = {}
        self.access_key_ids: list[str] = []
        self.created_date = ""

    class Event(Aggregate.Event):
        call: JSON
        request: JSON

    class Created(Event, Aggregate.Created):
        arn: str
        name: str
        account: str
        principal_type: str
        access_key_id: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Principal)
            aggregate.arn = self.arn
            aggregate.name = self.name
            aggregate.account = self.account
            aggregate.principal_type = self.principal_type
            aggregate.access_key_ids = [self.access_key_id]
            aggregate.created_date = iso(self.timestamp)

    class Disabled(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Principal)
            aggregate.enabled = False

    class Enabled(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Principal)
            aggregate.enabled = True

    class Deleted(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Principal)
            aggregate.deleted = True
            aggregate.enabled = False

    class PolicyAttached(Event):
        policy_name: str
        policy: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Principal)
            aggregate.policies[self.policy_name] = self.policy

    class PolicyDetached(Event):
        policy_name: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Principal)
            aggregate.policies.pop(self.policy_name, None)

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def stream_id(arn: str) -> UUID:
        return uuid5(PRINCIPAL_NAMESPACE, "principal:" + arn)

    @classmethod
    def create(
        cls,
        *,
        call: CallContext,
        timestamp: datetime,
        name: str,
        account: str,
        principal_type: str,
        access_key_id: str,
        request: JSON,
    ) -> Principal:
        arn = principal_arn(account, principal_type, name)
        return cls._create(
            cls.Created,
            id=cls.stream_id(arn),
            timestamp=timestamp,
            call=call.as_dict(),
            request=request,
            arn=arn,
            name=name,
            account=account,
            principal_type=principal_type,
            access_key_id=access_key_id,
        )

    def recreate_check(self) -> None:
        """Raise AlreadyExistsError unless this principal was deleted."""
        if not self.deleted:
            raise AlreadyExistsError(f"A principal with the ARN {self.arn} already exists.")

    def _live(self) -> None:
        if self.deleted:
            raise NotFoundError(f"The principal {self.arn} cannot be found.")

    def _emit(self, cls: type[Principal.Event], call: CallContext, timestamp: datetime,
              request: JSON, **fields: Any) -> None:  # fmt: skip
        self.trigger_event(cls, timestamp=timestamp, call=call.as_dict(), request=request, **fields)

    def disable(self, *, call: CallContext, timestamp: datetime, request: JSON) -> None:
        self._live()
        self._emit(self.Disabled, call, timestamp, request)

    def enable(self, *, call: CallContext, timestamp: datetime, request: JSON) -> None:
        self._live()
        self._emit(self.Enabled, call, timestamp, request)

    def delete(self, *, call: CallContext, timestamp: datetime, request: JSON) -> None:
        self._live()
        self._emit(self.Deleted, call, timestamp, request)

    def attach_policy(
        self, *, call: CallContext, timestamp: datetime, request: JSON, name: str, policy: str
    ) -> None:
        """Attach (or replace) the named identity policy. Raises NotFoundError,
        ValidationError for a bad policy name."""
        self._live()
        if not POLICY_NAME_RE.match(name):
            raise ValidationError("The policy name must be 1-128 characters of [\\w+=,.@-].")
        self._emit(self.PolicyAttached, call, timestamp, request, policy_name=name, policy=policy)

    def detach_policy(
        self, *, call: CallContext, timestamp: datetime, request: JSON, name: str
    ) -> None:
        """Raises NotFoundError when no policy of that name is attached."""
        self._live()
        if name not in self.policies:
            raise NotFoundError(f"The policy {name} is not attached to {self.arn}.")
        self._emit(self.PolicyDetached, call, timestamp, request, policy_name=name)


class AccessKey(Aggregate):
    """An access key id and its sealed secret, owned by one principal."""

    def __init__(self) -> None:
        self.access_key_id = ""
        self.principal_arn = ""
        self.sealed: JSON = {}
        self.active = True

    class Event(Aggregate.Event):
        call: JSON
        request: JSON

    class Created(Event, Aggregate.Created):
        access_key_id: str
        principal_arn: str
        sealed: JSON

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, AccessKey)
            aggregate.access_key_id = self.access_key_id
            aggregate.principal_arn = self.principal_arn
            aggregate.sealed = dict(self.sealed)

    class Deactivated(Event):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, AccessKey)
            aggregate.active = False

    @staticmethod
    def stream_id(access_key_id: str) -> UUID:
        return uuid5(PRINCIPAL_NAMESPACE, "access-key:" + access_key_id)

    @classmethod
    def create(
        cls,
        *,
        call: CallContext,
        timestamp: datetime,
        access_key_id: str,
        principal_arn: str,
        sealed: JSON,
        request: JSON,
    ) -> AccessKey:
        return cls._create(
            cls.Created,
            id=cls.stream_id(access_key_id),
            timestamp=timestamp,
            call=call.as_dict(),
            request=request,
            access_key_id=access_key_id,
            principal_arn=principal_arn,
            sealed=sealed,
        )

    def deactivate(self, *, call: CallContext, timestamp: datetime, request: JSON) -> None:
        if self.active:
            self.trigger_event(
                self.Deactivated, timestamp=timestamp, call=call.as_dict(), request=request
            )
