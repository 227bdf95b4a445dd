"""Issue 3 acceptance: the management plane on real SoftHSM2, on SQLite and PostgreSQL.

Rotation and deletion over a moving clock, one ledger event (with its CloudTrail name)
per successful action and one ``ApiCall.Failed`` per failure, replay at any point in
time, and grant tokens never stored.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

import pytest

from consumers.cloudtrail import cloudtrail_record, cloudtrail_view
from ledger.bootstrap import open_ledger
from ledger.chain import verify_chain
from ledger.clock import FixedClock
from ledger.errors import KeyLedgerError, NotFoundError
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings
from projections.catalog import (
    KeyCatalog,
    describe_key_at,
    get_key_policy_at,
    list_aliases_at,
    list_grants_at,
    state_at,
)
from projections.maintenance import run_maintenance

pytestmark = pytest.mark.softhsm

T0 = datetime(2025, 3, 3, 9, 30, tzinfo=UTC)
ACCOUNT = "111122223333"
ADMIN = Caller(principal="arn:aws:iam::111122223333:root", source_ip="192.0.2.10")
GRANTEE = "arn:aws:iam::111122223333:role/app"
CTX = {"purpose": "acceptance"}
POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "root",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
)
UNKNOWN_GRANT = "0" * 64


def days(n: int) -> timedelta:
    return timedelta(days=n)


@dataclass
class Env:
    """A ledger on a hand-moved clock, with its catalog."""

    ledger: KeyLedger
    clock: FixedClock
    catalog: KeyCatalog

    def head(self) -> int:
        return self.ledger.db.head_seq()

    def event(self, seq: int) -> dict[str, Any]:
        return self.ledger.db.read_records(seq - 1, 1)[0].event()

    def view(self, seq: int) -> dict[str, Any]:
        return cloudtrail_view(self.event(seq), seq=seq, ledger_id=self.ledger.ledger_id)

    def maintain(self) -> list[tuple[str, str]]:
        return run_maintenance(self.ledger, self.catalog)

    def create_key(self, **kw: Any) -> dict[str, Any]:
        md: dict[str, Any] = self.ledger.create_key(caller=ADMIN, **kw)["KeyMetadata"]
        return md

    def encrypt(self, key_id: str, plaintext: bytes) -> bytes:
        blob: bytes = self.ledger.encrypt(
            caller=ADMIN, key_id=key_id, plaintext=plaintext, encryption_context=CTX
        )["CiphertextBlob"]
        return blob

    def decrypt(self, blob: bytes, key_id: str | None = None) -> bytes:
        out: bytes = self.ledger.decrypt(
            caller=ADMIN, ciphertext_blob=blob, key_id=key_id, encryption_context=CTX
        )["Plaintext"]
        return out

    def one_event(self, name: str, action: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        """Run a successful action; assert it added exactly one record named ``name``."""
        before = self.head()
        result = action()
        assert self.head() == before + 1, name
        view = self.view(before + 1)
        assert view["eventName"] == name
        assert "errorCode" not in view, name
        return result, view

    def fails(self, aws_name: str, operation: str, action: Callable[[], Any]) -> dict[str, Any]:
        """Run a failing action; assert one ApiCall.Failed with ``aws_name`` and no
        change to the catalog."""
        self.catalog.catch_up()
        snapshot = self.catalog.snapshot()
        before = self.head()
        with pytest.raises(KeyLedgerError) as info:
            action()
        assert info.value.aws_name == aws_name, (operation, info.value)
        assert self.head() == before + 1, operation
        event = self.event(before + 1)
        assert event["topic"] == "ledger.domain.model:ApiCall.Failed", operation
        assert event["error_code"] == aws_name, operation
        view = self.view(before + 1)
        assert (view["eventName"], view["errorCode"]) == (operation, aws_name)
        assert self.catalog.snapshot() == snapshot, operation
        return view


@pytest.fixture
def make_env(
    ledger_settings: Settings, softhsm_keystore: Pkcs11KeyStore
) -> Iterator[Callable[..., Env]]:
    """Opens one ledger on a FixedClock at T0 (settings overridable) per call."""
    opened: list[KeyLedger] = []

    def make(**overrides: Any) -> Env:
        clock = FixedClock(T0)
        settings = replace(ledger_settings, **overrides)
        app = open_ledger(settings, keystore=softhsm_keystore, clock=clock)
        opened.append(app)
        return Env(ledger=app, clock=clock, catalog=KeyCatalog(app.db))

    yield make
    for app in opened:
        app.close()


def blob_version(blob: bytes) -> int:
    version: int = struct.unpack(">I", blob[17:21])[0]
    return version


def verify(env: Env) -> None:
    result = verify_chain(env.ledger.db.iter_chain(), env.ledger.db.iter_events())
    assert result.count == env.head()


# ---------------------------------------------------------------------------- 1. rotation


def test_rotation_keeps_every_backing_key_version_decryptable(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(on_demand_rotation_limit=1)
    L = env.ledger
    key = env.create_key(description="rotating")
    kid, arn = key["KeyId"], key["Arn"]
    plaintexts = [b"under version 1", b"under version 2", b"under version 3"]
    blobs = [env.encrypt(kid, plaintexts[0])]

    env.clock.advance(days(1))
    on_demand_at = env.clock.now()
    assert L.rotate_key_on_demand(caller=ADMIN, key_id=kid) == {"KeyId": arn}
    blobs.append(env.encrypt(kid, plaintexts[1]))

    env.clock.advance(days(1))
    enabled_at = env.clock.now()
    L.enable_key_rotation(caller=ADMIN, key_id=kid, rotation_period_in_days=90)
    status = L.get_key_rotation_status(caller=ADMIN, key_id=kid)
    assert status["NextRotationDate"] == (enabled_at + days(90)).timestamp()

    env.clock.advance(days(89))
    assert env.maintain() == []  # one day short of the period
    env.clock.advance(days(2))
    automatic_at = env.clock.now()
    assert env.maintain() == [("RotateKey", arn)]
    assert env.maintain() == []  # nothing more is due
    blobs.append(env.encrypt(kid, plaintexts[2]))

    assert [blob_version(b) for b in blobs] == [1, 2, 3]
    for blob, plaintext in zip(blobs, plaintexts, strict=True):
        assert env.decrypt(blob) == plaintext
        assert env.decrypt(blob, key_id=arn) == plaintext

    rotations = L.list_key_rotations(caller=ADMIN, key_id=kid)
    assert rotations["Truncated"] is False
    assert [(r["KeyId"], r["RotationType"], r["RotationDate"]) for r in rotations["Rotations"]] == [
        (arn, "ON_DEMAND", on_demand_at.timestamp()),
        (arn, "AUTOMATIC", automatic_at.timestamp()),
    ]
    material_ids = [r["KeyMaterialId"] for r in rotations["Rotations"]]
    assert len(set(material_ids)) == 2 and key["CurrentKeyMaterialId"] not in material_ids
    current = L.describe_key(caller=ADMIN, key_id=kid)["KeyMetadata"]["CurrentKeyMaterialId"]
    assert current == material_ids[-1]
    assert env.catalog.describe_key(UUID(kid), arn)["KeyMetadata"]["CurrentKeyMaterialId"] == (
        current
    )

    status = L.get_key_rotation_status(caller=ADMIN, key_id=kid)
    assert status == {
        "KeyRotationEnabled": True,
        "KeyId": arn,
        "RotationPeriodInDays": 90,
        "NextRotationDate": (automatic_at + days(90)).timestamp(),
    }

    # The automatic rotation does not count towards the on-demand limit (1 here).
    env.fails(
        "LimitExceededException",
        "RotateKeyOnDemand",
        lambda: L.rotate_key_on_demand(caller=ADMIN, key_id=kid),
    )
    for period in (89, 2561):
        env.fails(
            "ValidationException",
            "EnableKeyRotation",
            partial(
                L.enable_key_rotation, caller=ADMIN, key_id=kid, rotation_period_in_days=period
            ),
        )
    assert L.get_key_rotation_status(caller=ADMIN, key_id=kid) == status
    for period in (90, 2560):  # the bounds themselves are accepted
        L.enable_key_rotation(caller=ADMIN, key_id=kid, rotation_period_in_days=period)
    assert L.get_key_rotation_status(caller=ADMIN, key_id=kid)["RotationPeriodInDays"] == 2560
    verify(env)


def test_the_default_on_demand_rotation_limit_comes_from_settings(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(on_demand_rotation_limit=3)
    kid = env.create_key()["KeyId"]
    for _ in range(3):
        env.ledger.rotate_key_on_demand(caller=ADMIN, key_id=kid)
    env.fails(
        "LimitExceededException",
        "RotateKeyOnDemand",
        lambda: env.ledger.rotate_key_on_demand(caller=ADMIN, key_id=kid),
    )
    rotations = env.ledger.list_key_rotations(caller=ADMIN, key_id=kid)["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["ON_DEMAND"] * 3


# ---------------------------------------------------------------------------- 2. deletion


def test_scheduled_deletion_happens_at_the_end_of_the_window_and_not_before(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    L = env.ledger
    key = env.create_key(description="doomed")
    keep = env.create_key(description="kept")
    kid, arn, uuid_ = key["KeyId"], key["Arn"], UUID(key["KeyId"])
    blob = env.encrypt(kid, b"old secret")

    env.clock.advance(days(1))
    scheduled_at = env.clock.now()
    response = L.schedule_key_deletion(caller=ADMIN, key_id=kid, pending_window_in_days=7)
    assert response == {
        "KeyId": arn,
        "DeletionDate": (scheduled_at + days(7)).timestamp(),
        "KeyState": "PendingDeletion",
        "PendingWindowInDays": 7,
    }

    env.clock.advance(days(6))
    assert env.maintain() == []
    for md in (
        L.describe_key(caller=ADMIN, key_id=kid)["KeyMetadata"],
        env.catalog.describe_key(uuid_, arn)["KeyMetadata"],
    ):
        assert (md["KeyState"], md["Enabled"]) == ("PendingDeletion", False)
        assert md["DeletionDate"] == (scheduled_at + days(7)).timestamp()
        assert md["PendingDeletionWindowInDays"] == 7
    env.fails(
        "KMSInvalidStateException", "Encrypt", lambda: env.encrypt(kid, b"refused")
    )  # fmt: skip
    env.fails("KMSInvalidStateException", "Decrypt", lambda: env.decrypt(blob))
    env.fails("KMSInvalidStateException", "Decrypt", lambda: env.decrypt(blob, key_id=arn))

    env.clock.advance(days(1))
    before = env.head()
    assert env.maintain() == [("DeleteKey", arn)]
    assert env.head() == before + 1
    assert env.maintain() == []

    env.fails("NotFoundException", "DescribeKey", lambda: L.describe_key(caller=ADMIN, key_id=kid))
    with pytest.raises(NotFoundError):
        env.catalog.describe_key(uuid_, arn)
    listed = [k["KeyId"] for k in env.catalog.list_keys()["Keys"]]
    assert listed == [keep["KeyId"]]
    # The blob names a key that no longer exists: one undetailed decryption error.
    env.fails("InvalidCiphertextException", "Decrypt", lambda: env.decrypt(blob))
    env.fails("NotFoundException", "Decrypt", lambda: env.decrypt(blob, key_id=arn))
    env.fails("NotFoundException", "Encrypt", lambda: env.encrypt(kid, b"gone"))
    verify(env)


def test_deletion_window_is_7_to_30_days_and_cancel_returns_the_key_to_disabled(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    L = env.ledger
    key = env.create_key()
    kid, arn = key["KeyId"], key["Arn"]
    for window in (6, 31):
        env.fails(
            "ValidationException",
            "ScheduleKeyDeletion",
            partial(
                L.schedule_key_deletion, caller=ADMIN, key_id=kid, pending_window_in_days=window
            ),
        )
    assert L.describe_key(caller=ADMIN, key_id=kid)["KeyMetadata"]["KeyState"] == "Enabled"

    for window in (30, 7):  # both bounds are accepted
        L.schedule_key_deletion(caller=ADMIN, key_id=kid, pending_window_in_days=window)
        assert L.cancel_key_deletion(caller=ADMIN, key_id=kid) == {"KeyId": arn}
        for md in (
            L.describe_key(caller=ADMIN, key_id=kid)["KeyMetadata"],
            env.catalog.describe_key(UUID(kid), arn)["KeyMetadata"],
        ):
            assert (md["KeyState"], md["Enabled"]) == ("Disabled", False)
            assert "DeletionDate" not in md and "PendingDeletionWindowInDays" not in md
        env.fails("DisabledException", "Encrypt", lambda: env.encrypt(kid, b"disabled"))
        if window == 30:
            L.enable_key(caller=ADMIN, key_id=kid)

    env.clock.advance(days(31))  # well past both cancelled dates
    assert env.maintain() == []
    assert L.describe_key(caller=ADMIN, key_id=kid)["KeyMetadata"]["KeyState"] == "Disabled"
    L.enable_key(caller=ADMIN, key_id=kid)
    assert env.decrypt(env.encrypt(kid, b"usable again")) == b"usable again"
    env.fails(
        "KMSInvalidStateException",
        "CancelKeyDeletion",
        lambda: L.cancel_key_deletion(caller=ADMIN, key_id=kid),
    )
    verify(env)


def test_deleting_a_key_deletes_the_aliases_that_refer_to_it(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    L = env.ledger
    key = env.create_key()
    other = env.create_key()
    L.create_alias(caller=ADMIN, alias_name="alias/doomed", target_key_id=key["KeyId"])
    L.schedule_key_deletion(caller=ADMIN, key_id=key["KeyId"], pending_window_in_days=7)
    env.clock.advance(days(7))
    assert env.maintain() == [("DeleteKey", key["Arn"])]
    assert env.catalog.list_aliases()["Aliases"] == []
    assert list_aliases_at(state_at(L.db))["Aliases"] == []
    # The name is free again.
    L.create_alias(caller=ADMIN, alias_name="alias/doomed", target_key_id=other["KeyId"])


# --------------------------------------------------- 3. one event per action, its CloudTrail


def test_every_successful_action_adds_one_event_with_the_aws_event_name(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    L = env.ledger
    key, _ = env.one_event("CreateKey", lambda: env.create_key(description="one"))
    kid, arn = key["KeyId"], key["Arn"]
    other, _ = env.one_event("CreateKey", lambda: env.create_key(description="two"))
    issued: dict[str, str] = {}

    def create_grant() -> None:
        out = L.create_grant(
            caller=ADMIN, key_id=kid, grantee_principal=GRANTEE, operations=["Encrypt", "Decrypt"]
        )
        issued.update(out)

    on_demand_material: dict[str, str] = {}

    def rotate_on_demand() -> None:
        L.rotate_key_on_demand(caller=ADMIN, key_id=kid)
        # The write model directly: a DescribeKey call would add its own record.
        on_demand_material["id"] = str(L.load_key(UUID(kid)).current_material_id)

    def maintenance_after(delta: timedelta, expected: str) -> Callable[[], None]:
        def run() -> None:
            env.clock.advance(delta)
            assert env.maintain() == [(expected, arn)]

        return run

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("DisableKey", lambda: L.disable_key(caller=ADMIN, key_id=arn)),
        ("EnableKey", lambda: L.enable_key(caller=ADMIN, key_id=kid)),
        (
            "UpdateKeyDescription",
            lambda: L.update_key_description(caller=ADMIN, key_id=kid, description="uno"),
        ),
        (
            "TagResource",
            lambda: L.tag_resource(
                caller=ADMIN, key_id=kid, tags=[{"TagKey": "team", "TagValue": "sec"}]
            ),
        ),
        ("UntagResource", lambda: L.untag_resource(caller=ADMIN, key_id=kid, tag_keys=["team"])),
        ("PutKeyPolicy", lambda: L.put_key_policy(caller=ADMIN, key_id=kid, policy=POLICY)),
        (
            "EnableKeyRotation",
            lambda: L.enable_key_rotation(caller=ADMIN, key_id=kid, rotation_period_in_days=90),
        ),
        ("DisableKeyRotation", lambda: L.disable_key_rotation(caller=ADMIN, key_id=kid)),
        ("RotateKeyOnDemand", rotate_on_demand),
        (
            "EnableKeyRotation",
            lambda: L.enable_key_rotation(caller=ADMIN, key_id=kid, rotation_period_in_days=90),
        ),
        ("RotateKey", maintenance_after(days(90), "RotateKey")),
        (
            "CreateAlias",
            lambda: L.create_alias(caller=ADMIN, alias_name="alias/app", target_key_id=kid),
        ),
        (
            "UpdateAlias",
            lambda: L.update_alias(
                caller=ADMIN, alias_name="alias/app", target_key_id=other["KeyId"]
            ),
        ),
        ("DeleteAlias", lambda: L.delete_alias(caller=ADMIN, alias_name="alias/app")),
        ("CreateGrant", create_grant),
        ("RetireGrant", lambda: L.retire_grant(caller=ADMIN, grant_token=issued["GrantToken"])),
        ("CreateGrant", create_grant),
        (
            "RevokeGrant",
            lambda: L.revoke_grant(caller=ADMIN, key_id=kid, grant_id=issued["GrantId"]),
        ),
        (
            "ScheduleKeyDeletion",
            lambda: L.schedule_key_deletion(caller=ADMIN, key_id=kid, pending_window_in_days=7),
        ),
        ("CancelKeyDeletion", lambda: L.cancel_key_deletion(caller=ADMIN, key_id=kid)),
        (
            "ScheduleKeyDeletion",
            lambda: L.schedule_key_deletion(caller=ADMIN, key_id=kid, pending_window_in_days=7),
        ),
        ("DeleteKey", maintenance_after(days(7), "DeleteKey")),
    ]
    views: dict[str, dict[str, Any]] = {}
    for name, action in steps:
        _, view = env.one_event(name, action)
        views[name] = view
        moved = name in ("UpdateAlias", "DeleteAlias")  # the alias points at the other key
        assert view["resources"][0]["ARN"] == (other["Arn"] if moved else arn), name
        assert view["readOnly"] is False

    for name, view in views.items():
        service = name in ("RotateKey", "DeleteKey")
        assert view["eventType"] == ("AwsServiceEvent" if service else "AwsApiCall"), name
        if service:  # as AWS's RotateKey and DeleteKey examples
            assert view["userIdentity"] == {"accountId": ACCOUNT, "invokedBy": "AWS Internal"}
            assert view["requestParameters"] is None and view["responseElements"] is None
            assert "additionalEventData" not in view, name
        else:
            assert view["userIdentity"]["arn"] == ADMIN.principal, name
            assert view["sourceIPAddress"] == ADMIN.source_ip, name
    # requestParameters.keyId is what the caller sent.
    assert views["DisableKey"]["requestParameters"] == {"keyId": arn}
    assert views["EnableKey"]["requestParameters"] == {"keyId": kid}
    # AWS puts the automatic rotation's details in serviceEventDetails (rotatekey-1.11.json).
    details = views["RotateKey"]["serviceEventDetails"]
    assert details["rotationType"] == "AUTOMATIC" and details["keyOrigin"] == "AWS_KMS"
    assert details["previousKeyMaterialId"] == on_demand_material["id"]
    assert details["currentKeyMaterialId"] != on_demand_material["id"]
    assert views["RotateKeyOnDemand"]["additionalEventData"]["rotationType"] == "ON_DEMAND"
    assert views["CreateGrant"]["responseElements"] == {"grantId": issued["GrantId"], "keyId": arn}
    verify(env)


def test_every_failure_adds_one_failed_record_with_the_aws_error_and_changes_nothing(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    L = env.ledger
    key = env.create_key(tags=[{"TagKey": f"t{i}", "TagValue": "v"} for i in range(10)])
    kid = key["KeyId"]
    L.create_alias(caller=ADMIN, alias_name="alias/app", target_key_id=kid)
    grant = L.create_grant(
        caller=ADMIN, key_id=kid, grantee_principal=GRANTEE, operations=["Decrypt"]
    )
    token = grant["GrantToken"]
    # A well-formed token for a grant that does not exist (its secret is wrong, too).
    forged = base64.urlsafe_b64encode(
        bytes([1]) + UUID(kid).bytes + bytes.fromhex(UNKNOWN_GRANT) + bytes(32)
    ).decode().rstrip("=")  # fmt: skip
    tags51 = [{"TagKey": f"k{i}", "TagValue": "v"} for i in range(51)]
    tags41 = [{"TagKey": f"n{i}", "TagValue": "v"} for i in range(41)]  # 10 + 41 > 50

    def alias(name: str, target: str = kid) -> Callable[[], Any]:
        return lambda: L.create_alias(caller=ADMIN, alias_name=name, target_key_id=target)

    def tag(tags: list[dict[str, str]]) -> Callable[[], Any]:
        return lambda: L.tag_resource(caller=ADMIN, key_id=kid, tags=tags)

    cases: list[tuple[str, str, Callable[[], Any]]] = [
        ("ValidationException", "CreateAlias", alias("alias/has space")),
        ("ValidationException", "CreateAlias", alias("app-without-prefix")),
        ("NotAuthorizedException", "CreateAlias", alias("alias/aws/mine")),
        ("ValidationException", "CreateAlias", alias("alias/second", target="alias/app")),
        ("AlreadyExistsException", "CreateAlias", alias("alias/app")),
        (
            "NotAuthorizedException",
            "UpdateAlias",
            lambda: L.update_alias(caller=ADMIN, alias_name="alias/aws/x", target_key_id=kid),
        ),
        (
            "NotFoundException",
            "DeleteAlias",
            lambda: L.delete_alias(caller=ADMIN, alias_name="alias/none"),
        ),
        (
            "NotFoundException",
            "RevokeGrant",
            lambda: L.revoke_grant(caller=ADMIN, key_id=kid, grant_id=UNKNOWN_GRANT),
        ),
        (
            "NotFoundException",
            "RetireGrant",
            lambda: L.retire_grant(caller=ADMIN, key_id=kid, grant_id=UNKNOWN_GRANT),
        ),
        (
            "InvalidGrantIdException",
            "RevokeGrant",
            lambda: L.revoke_grant(caller=ADMIN, key_id=kid, grant_id="not-a-grant-id"),
        ),
        (
            "InvalidGrantTokenException",
            "RetireGrant",
            lambda: L.retire_grant(caller=ADMIN, grant_token="not a token!"),
        ),
        (
            "InvalidGrantTokenException",
            "RetireGrant",
            lambda: L.retire_grant(caller=ADMIN, grant_token=token[:-4]),
        ),
        (
            "InvalidGrantTokenException",
            "RetireGrant",
            lambda: L.retire_grant(caller=ADMIN, grant_token=forged),
        ),
        (
            "MalformedPolicyDocumentException",
            "PutKeyPolicy",
            lambda: L.put_key_policy(caller=ADMIN, key_id=kid, policy="{not json"),
        ),
        (
            "MalformedPolicyDocumentException",
            "PutKeyPolicy",
            lambda: L.put_key_policy(caller=ADMIN, key_id=kid, policy='{"Version":"2012-10-17"}'),
        ),
        (
            "InvalidMarkerException",
            "ListGrants",
            lambda: L.list_grants(caller=ADMIN, key_id=kid, marker="bogus-marker"),
        ),
        (
            "InvalidMarkerException",
            "ListKeyRotations",
            lambda: L.list_key_rotations(caller=ADMIN, key_id=kid, marker="bogus-marker"),
        ),
        (
            "ValidationException",
            "ScheduleKeyDeletion",
            lambda: L.schedule_key_deletion(caller=ADMIN, key_id=kid, pending_window_in_days=6),
        ),
        (
            "ValidationException",
            "ScheduleKeyDeletion",
            lambda: L.schedule_key_deletion(caller=ADMIN, key_id=kid, pending_window_in_days=31),
        ),
        (
            "ValidationException",
            "EnableKeyRotation",
            lambda: L.enable_key_rotation(caller=ADMIN, key_id=kid, rotation_period_in_days=89),
        ),
        (
            "ValidationException",
            "EnableKeyRotation",
            lambda: L.enable_key_rotation(caller=ADMIN, key_id=kid, rotation_period_in_days=2561),
        ),
        (
            "TagException",
            "TagResource",
            tag([{"TagKey": "aws:owner", "TagValue": "me"}]),
        ),
        ("TagException", "TagResource", tag(tags51)),
        ("TagException", "TagResource", tag(tags41)),
        ("TagException", "CreateKey", lambda: env.create_key(tags=tags51)),
        (
            "TagException",
            "CreateKey",
            lambda: env.create_key(tags=[{"TagKey": "AWS:x", "TagValue": "v"}]),
        ),
    ]
    for aws_name, operation, action in cases:
        view = env.fails(aws_name, operation, action)
        assert view["eventType"] == "AwsApiCall"
        assert token not in json.dumps(view)
    # The grant, alias, tags and policy are as they were.
    assert [g["GrantId"] for g in L.list_grants(caller=ADMIN, key_id=kid)["Grants"]] == [
        grant["GrantId"]
    ]
    assert len(L.list_resource_tags(caller=ADMIN, key_id=kid)["Tags"]) == 10
    assert env.catalog.list_aliases()["Aliases"][0]["TargetKeyId"] == kid
    verify(env)


# ---------------------------------------------------------------------------- 4. replay


@dataclass
class Moment:
    """What the read side answered right after one step of the history."""

    label: str
    seq: int
    time: datetime
    describe: dict[str, Any] | None  # None: the key did not exist (NotFoundException)
    aliases: list[dict[str, Any]]
    grants: list[dict[str, Any]] | None
    policy: str | None


def test_state_at_any_time_or_seq_matches_what_was_answered_then(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    L = env.ledger
    moments: list[Moment] = []
    ids: dict[str, str] = {}

    def key_id() -> UUID:
        return UUID(ids["kid"])

    def arn() -> str:
        return L.settings.key_arn(ids["kid"])

    def record(label: str) -> None:
        seq = env.head()
        try:
            describe: dict[str, Any] | None = env.catalog.describe_key(key_id(), arn())
        except NotFoundError:
            describe = None
        grants = policy = None
        if describe is not None:
            # The write model's answers; the catalog's DescribeKey must agree with it.
            assert L.describe_key(caller=ADMIN, key_id=ids["kid"]) == describe, label
            listed = L.list_grants(caller=ADMIN, key_id=ids["kid"])
            assert listed["Truncated"] is False
            grants = listed["Grants"]
            policy = L.get_key_policy(caller=ADMIN, key_id=ids["kid"])["Policy"]
        aliases = env.catalog.list_aliases()["Aliases"]
        moments.append(Moment(label, seq, env.clock.now(), describe, aliases, grants, policy))
        env.clock.advance(timedelta(hours=7))

    def create() -> None:
        md = env.create_key(description="replayed", tags=[{"TagKey": "a", "TagValue": "1"}])
        ids["kid"] = md["KeyId"]
        env.encrypt(md["KeyId"], b"use is logged but changes no state")

    def tag_and_policy() -> None:
        L.tag_resource(caller=ADMIN, key_id=ids["kid"], tags=[{"TagKey": "b", "TagValue": "2"}])
        L.put_key_policy(caller=ADMIN, key_id=ids["kid"], policy=POLICY)

    def aliases() -> None:
        L.create_alias(caller=ADMIN, alias_name="alias/replay", target_key_id=ids["kid"])
        L.create_alias(caller=ADMIN, alias_name="alias/second", target_key_id=ids["kid"])

    def rotate() -> None:
        L.rotate_key_on_demand(caller=ADMIN, key_id=ids["kid"])
        L.enable_key_rotation(caller=ADMIN, key_id=ids["kid"], rotation_period_in_days=90)

    def disable() -> None:
        L.disable_key(caller=ADMIN, key_id=ids["kid"])
        L.update_key_description(caller=ADMIN, key_id=ids["kid"], description="retired")

    def grants() -> None:
        L.enable_key(caller=ADMIN, key_id=ids["kid"])
        for principal in (GRANTEE, "arn:aws:iam::111122223333:role/batch"):
            L.create_grant(
                caller=ADMIN, key_id=ids["kid"], grantee_principal=principal,
                operations=["Decrypt"], retiring_principal=ADMIN.principal, name="g",
            )  # fmt: skip

    def revoke_and_move_alias() -> None:
        first = L.list_grants(caller=ADMIN, key_id=ids["kid"])["Grants"][0]["GrantId"]
        L.revoke_grant(caller=ADMIN, key_id=ids["kid"], grant_id=first)
        L.delete_alias(caller=ADMIN, alias_name="alias/second")
        L.untag_resource(caller=ADMIN, key_id=ids["kid"], tag_keys=["a"])

    def automatic_rotation() -> None:
        env.clock.advance(days(91))
        assert env.maintain() == [("RotateKey", arn())]
        # The deleted alias name is taken again: the same alias stream continues.
        L.create_alias(caller=ADMIN, alias_name="alias/second", target_key_id=ids["kid"])

    def schedule() -> None:
        L.schedule_key_deletion(caller=ADMIN, key_id=ids["kid"], pending_window_in_days=7)

    def delete() -> None:
        env.clock.advance(days(7))
        assert env.maintain() == [("DeleteKey", arn())]

    env.create_key(description="bystander")
    ids["kid"] = str(UUID(int=1))  # not created yet
    record("before")
    for step in (create, tag_and_policy, aliases, rotate, disable, grants,
                 revoke_and_move_alias, automatic_rotation, schedule, delete):  # fmt: skip
        step()
        record(step.__name__)

    assert len({m.seq for m in moments}) == len(moments)  # every step moved the log on
    for m in moments:
        for state in (state_at(L.db, time=m.time), state_at(L.db, seq=m.seq)):
            assert list_aliases_at(state)["Aliases"] == m.aliases, m.label
            if m.describe is None:
                with pytest.raises(NotFoundError):
                    describe_key_at(state, key_id(), arn())
                with pytest.raises(NotFoundError):
                    list_grants_at(state, key_id(), arn())
                continue
            assert describe_key_at(state, key_id(), arn()) == m.describe, m.label
            assert list_grants_at(state, key_id(), arn())["Grants"] == m.grants, m.label
            assert get_key_policy_at(state, key_id(), arn())["Policy"] == m.policy, m.label

    live = env.catalog.snapshot()
    assert env.catalog.rebuild() == env.head()
    assert env.catalog.snapshot() == live
    rebuilt_small = KeyCatalog(L.db, batch_size=3)  # same tables, rebuilt in small batches
    rebuilt_small.rebuild()
    assert rebuilt_small.snapshot() == live
    verify(env)


# ---------------------------------------------------------------------------- 5. security


def test_grant_tokens_appear_nowhere_in_stored_events_or_cloudtrail_views(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    L = env.ledger
    kid = env.create_key()["KeyId"]
    tokens = []
    for principal in (GRANTEE, "arn:aws:iam::111122223333:role/other"):
        grant = L.create_grant(
            caller=ADMIN, key_id=kid, grantee_principal=principal,
            operations=["Encrypt", "Decrypt", "RetireGrant"], name="same-name",
        )  # fmt: skip
        tokens.append(grant["GrantToken"])
        # A same-name retry returns the same grant with a new token.
        retry = L.create_grant(
            caller=ADMIN, key_id=kid, grantee_principal=principal,
            operations=["Encrypt", "Decrypt", "RetireGrant"], name="same-name",
        )  # fmt: skip
        assert retry["GrantId"] == grant["GrantId"] and retry["GrantToken"] != grant["GrantToken"]
        tokens.append(retry["GrantToken"])
    L.retire_grant(caller=ADMIN, grant_token=tokens[0])
    with pytest.raises(KeyLedgerError):  # retired already: a failure record, no token in it
        L.retire_grant(caller=ADMIN, grant_token=tokens[1])
    with pytest.raises(KeyLedgerError):  # a token with one character changed
        changed = "B" if tokens[2].endswith("A") else "A"  # never the same character
        L.retire_grant(caller=ADMIN, grant_token=tokens[2][:-1] + changed)

    forbidden: list[bytes] = []
    for token in tokens:
        payload = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        secret = payload[-32:]
        forbidden += [
            token.encode(),
            token[20:60].encode(),
            secret,
            secret.hex().encode(),
            base64.b64encode(secret),
            base64.urlsafe_b64encode(secret).rstrip(b"="),
        ]
    records = L.db.read_records(0, 100_000)
    assert len(records) == env.head() >= 8
    ledger_id = L.ledger_id
    for r in records:
        published = json.dumps(
            cloudtrail_record(
                r.event(), seq=r.seq, record_hash=r.record_hash, prev=r.prev, ledger_id=ledger_id
            )
        ).encode()
        for needle in forbidden:
            assert needle not in r.data, r.seq
            assert needle not in published, r.seq


def test_as_of_time_skips_future_dated_records_instead_of_stopping_at_them(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    ledger = env.ledger
    key = ledger.create_key(caller=ADMIN, description="v1")["KeyMetadata"]
    env.clock.advance(days(365 * 4))  # e.g. `maintenance run --now` far in the future
    ledger.update_key_description(caller=ADMIN, key_id=key["KeyId"], description="future")
    env.clock.advance(-days(365 * 4 - 10))  # back to the real clock
    ledger.disable_key(caller=ADMIN, key_id=key["KeyId"])
    arn_uuid = UUID(key["KeyId"])
    state = state_at(ledger.db, time=T0 + days(20))
    md = describe_key_at(state, arn_uuid, key["Arn"])["KeyMetadata"]
    assert (md["KeyState"], md["Description"]) == ("Disabled", "v1")
    later = state_at(ledger.db, time=T0 + days(365 * 5))
    md = describe_key_at(later, arn_uuid, key["Arn"])["KeyMetadata"]
    assert (md["KeyState"], md["Description"]) == ("Disabled", "future")


def test_deleting_a_key_destroys_its_material_in_the_hsm(
    make_env: Callable[..., Env], softhsm_keystore: Pkcs11KeyStore
) -> None:
    from ledger.domain.model import material_from_json
    from ledger.errors import HsmError

    env = make_env()
    ledger = env.ledger
    key = ledger.create_key(caller=ADMIN)["KeyMetadata"]
    ledger.rotate_key_on_demand(caller=ADMIN, key_id=key["KeyId"])
    blob = ledger.encrypt(caller=ADMIN, key_id=key["KeyId"], plaintext=b"shred me")[
        "CiphertextBlob"
    ]
    ledger.schedule_key_deletion(caller=ADMIN, key_id=key["KeyId"], pending_window_in_days=7)
    env.clock.advance(days(7))
    assert run_maintenance(ledger, env.catalog) == [("DeleteKey", key["Arn"])]
    # The log still holds both wrapped versions; the HSM can no longer unwrap either.
    stored = [
        e["material"]
        for e in (r.event() for r in ledger.db.read_records(0, 1000))
        if e["topic"].endswith(("Key.Created", "Key.Rotated"))
    ]
    assert len(stored) == 2
    for material_json in stored:
        material = material_from_json(material_json)
        assert material.kek == f"keyledger-kek-{key['KeyId']}"
        with pytest.raises(HsmError, match="destroyed"):
            softhsm_keystore.encrypt(material, b"x", b"")
    with pytest.raises(KeyLedgerError):
        ledger.decrypt(caller=ADMIN, ciphertext_blob=blob)
