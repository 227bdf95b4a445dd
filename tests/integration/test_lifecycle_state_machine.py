"""Random key lifecycle sequences against the real KeyLedger and against tests.kms_model.

After every step the outcome (success, or the same AWS error name), the catalog's
DescribeKey fields, ListKeyRotations counts and the catalog's alias list must match the
model, which was written from AWS's documentation. Each example gets a fresh ledger
(SQLite file or PostgreSQL schema) on the session's SoftHSM2 token and a FixedClock;
teardown checks that the hash chain verifies and that a catalog rebuild reproduces it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import hypothesis
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger.bootstrap import open_ledger
from ledger.chain import verify_chain
from ledger.clock import FixedClock
from ledger.errors import KeyLedgerError, NotFoundError
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.service import Caller
from ledger.settings import Settings
from projections.catalog import KeyCatalog
from projections.maintenance import run_maintenance
from tests.kms_model import KmsError, KmsModel

pytestmark = pytest.mark.softhsm

START = datetime(2026, 1, 1, tzinfo=UTC)
CALLER = Caller(principal="arn:aws:iam::111122223333:root")
GRANTEE = "arn:aws:iam::111122223333:role/app"
ON_DEMAND_LIMIT = 2
ALIAS_POOL = ("alias/app", "alias/db", "alias/logs")
DESCRIPTIONS = ("", "payments", "audit logs")
CONTEXTS: tuple[dict[str, str], ...] = ({}, {"tenant": "acme"})
GRANT_NAMES = (None, "app-grant")

EXAMPLES = 40
STEPS = 30


@dataclass(frozen=True)
class Sealed:
    key_id: str
    blob: bytes
    plaintext: bytes
    context: dict[str, str]


@dataclass(frozen=True)
class IssuedGrant:
    key_id: str
    grant_id: str
    token: str


class LedgerFactory:
    """A fresh ledger per Hypothesis example: a new SQLite dir or PostgreSQL schema."""

    def __init__(self, settings: Settings, keystore: Pkcs11KeyStore, tmp_root: Path) -> None:
        self.settings = replace(settings, on_demand_rotation_limit=ON_DEMAND_LIMIT)
        self.keystore = keystore
        self.tmp_root = tmp_root

    def fresh(self) -> tuple[Settings, Callable[[], None]]:
        data_dir = Path(tempfile.mkdtemp(dir=self.tmp_root))
        if self.settings.database_url is None:
            return replace(self.settings, data_dir=data_dir), lambda: shutil.rmtree(data_dir)
        base = self.settings.database_url.split("?", 1)[0]
        schema = "kl_sm_" + uuid.uuid4().hex[:12]

        def drop() -> None:
            import psycopg

            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            shutil.rmtree(data_dir)

        return replace(
            self.settings, data_dir=data_dir, database_url=f"{base}?schema={schema}"
        ), drop


class LifecycleMachine(RuleBasedStateMachine):
    keys = Bundle("keys")
    sealed = Bundle("sealed")
    grants = Bundle("grants")

    def __init__(self, factory: LedgerFactory) -> None:
        super().__init__()
        settings, self._drop = factory.fresh()
        self.clock = FixedClock(START)
        self.ledger = open_ledger(settings, keystore=factory.keystore, clock=self.clock)
        self.catalog = KeyCatalog(self.ledger.db)
        self.model = KmsModel(on_demand_rotation_limit=ON_DEMAND_LIMIT)

    # ------------------------------------------------------------------ helpers

    def both(
        self, operation: str, model: Callable[[Any], object], service: Callable[[], Any]
    ) -> Any:
        """Run one operation on the service, then on the model (which may use ids the
        service returned); assert the same outcome; return the service's response or
        None when both failed."""
        try:
            response, failure = service(), None
        except KeyLedgerError as err:
            response, failure = None, err
        try:
            model(response)
            expected = None
        except KmsError as err:
            expected = err
        if expected is None:
            assert failure is None, (
                f"{operation}: AWS succeeds, the service raised "
                f"{failure.aws_name}: {failure.message}"
            )
            return response
        assert failure is not None, f"{operation}: AWS raises {expected}, the service succeeded"
        assert failure.aws_name in expected.names, (
            f"{operation}: AWS raises {expected}, the service raised "
            f"{failure.aws_name}: {failure.message}"
        )
        return None

    def arn(self, key_id: str) -> str:
        return self.ledger.settings.key_arn(key_id)

    # ------------------------------------------------------------------ key lifecycle

    def new_key(self, description: str) -> str:
        md = self.ledger.create_key(caller=CALLER, description=description)["KeyMetadata"]
        self.model.create_key(key_id=md["KeyId"], description=description)
        return str(md["KeyId"])

    @initialize(target=keys, description=st.sampled_from(DESCRIPTIONS))
    def create_first_key(self, description: str) -> str:
        return self.new_key(description)

    @rule(target=keys, description=st.sampled_from(DESCRIPTIONS))
    def create_key(self, description: str) -> str:
        return self.new_key(description)

    @rule(key=keys)
    def enable_key(self, key: str) -> None:
        self.both(
            "EnableKey",
            lambda _: self.model.enable_key(key),
            lambda: self.ledger.enable_key(caller=CALLER, key_id=key),
        )

    @rule(key=keys)
    def disable_key(self, key: str) -> None:
        self.both(
            "DisableKey",
            lambda _: self.model.disable_key(key),
            lambda: self.ledger.disable_key(caller=CALLER, key_id=key),
        )

    @rule(key=keys, days=st.integers(5, 32))
    def schedule_key_deletion(self, key: str, days: int) -> None:
        now = self.clock.now()
        out = self.both(
            "ScheduleKeyDeletion",
            lambda _: self.model.schedule_key_deletion(key, window_days=days, now=now),
            lambda: self.ledger.schedule_key_deletion(
                caller=CALLER, key_id=key, pending_window_in_days=days
            ),
        )
        if out is not None:
            assert out["KeyState"] == "PendingDeletion"
            assert out["PendingWindowInDays"] == days
            assert out["DeletionDate"] == (now + timedelta(days=days)).timestamp()

    @rule(key=keys)
    def cancel_key_deletion(self, key: str) -> None:
        self.both(
            "CancelKeyDeletion",
            lambda _: self.model.cancel_key_deletion(key),
            lambda: self.ledger.cancel_key_deletion(caller=CALLER, key_id=key),
        )

    # ------------------------------------------------------------------ rotation

    @rule(key=keys, period=st.integers(80, 2600))
    def enable_key_rotation(self, key: str, period: int) -> None:
        now = self.clock.now()
        self.both(
            "EnableKeyRotation",
            lambda _: self.model.enable_key_rotation(key, period_days=period, now=now),
            lambda: self.ledger.enable_key_rotation(
                caller=CALLER, key_id=key, rotation_period_in_days=period
            ),
        )

    @rule(key=keys)
    def disable_key_rotation(self, key: str) -> None:
        self.both(
            "DisableKeyRotation",
            lambda _: self.model.disable_key_rotation(key),
            lambda: self.ledger.disable_key_rotation(caller=CALLER, key_id=key),
        )

    @rule(key=keys)
    def rotate_key_on_demand(self, key: str) -> None:
        self.both(
            "RotateKeyOnDemand",
            lambda _: self.model.rotate_key_on_demand(key),
            lambda: self.ledger.rotate_key_on_demand(caller=CALLER, key_id=key),
        )

    @rule(days=st.integers(0, 40))
    def advance_clock_and_run_maintenance(self, days: int) -> None:
        self.clock.advance(timedelta(days=days))
        now = self.clock.now()
        done = run_maintenance(self.ledger, self.catalog)
        expected = self.model.run_due(now)
        assert sorted((name, arn.rsplit("/", 1)[1]) for name, arn in done) == sorted(expected)

    @precondition(lambda self: self.model.next_rotation_dates())
    @rule(extra_days=st.integers(0, 3))
    def advance_clock_past_a_rotation_date_and_run_maintenance(self, extra_days: int) -> None:
        """Periods are 90 days or more, so 0-40 day steps alone rarely reach one."""
        target = min(self.model.next_rotation_dates()) + timedelta(days=extra_days)
        self.advance_clock_and_run_maintenance(max((target - self.clock.now()).days, 0))

    # ------------------------------------------------------------------ crypto

    @rule(
        target=sealed,
        key=keys,
        plaintext=st.binary(min_size=1, max_size=64),
        context=st.sampled_from(CONTEXTS),
    )
    def encrypt(self, key: str, plaintext: bytes, context: dict[str, str]) -> Any:
        out = self.both(
            "Encrypt",
            lambda _: self.model.encrypt(key),
            lambda: self.ledger.encrypt(
                caller=CALLER, key_id=key, plaintext=plaintext, encryption_context=context
            ),
        )
        if out is None:
            return multiple()
        assert out["KeyId"] == self.arn(key)
        return Sealed(key_id=key, blob=out["CiphertextBlob"], plaintext=plaintext, context=context)

    @rule(target=sealed, alias=st.sampled_from(ALIAS_POOL), plaintext=st.binary(min_size=1))
    def encrypt_via_alias(self, alias: str, plaintext: bytes) -> Any:
        target: list[str] = []
        out = self.both(
            "Encrypt",
            lambda _: target.append(self.model.encrypt_via_alias(alias)),
            lambda: self.ledger.encrypt(caller=CALLER, key_id=alias, plaintext=plaintext),
        )
        if out is None:
            return multiple()
        assert out["KeyId"] == self.arn(target[0])
        return Sealed(key_id=target[0], blob=out["CiphertextBlob"], plaintext=plaintext, context={})

    @rule(item=sealed)
    def decrypt_earlier_ciphertext(self, item: Sealed) -> None:
        out = self.both(
            "Decrypt",
            lambda _: self.model.decrypt(item.key_id),
            lambda: self.ledger.decrypt(
                caller=CALLER,
                ciphertext_blob=item.blob,
                key_id=item.key_id,
                encryption_context=item.context,
            ),
        )
        if out is not None:
            assert out["Plaintext"] == item.plaintext
            assert out["KeyId"] == self.arn(item.key_id)

    # ------------------------------------------------------------------ aliases

    @rule(alias=st.sampled_from(ALIAS_POOL), key=keys)
    def create_alias(self, alias: str, key: str) -> None:
        self.both(
            "CreateAlias",
            lambda _: self.model.create_alias(alias, key),
            lambda: self.ledger.create_alias(caller=CALLER, alias_name=alias, target_key_id=key),
        )

    @rule(alias=st.sampled_from(ALIAS_POOL), key=keys)
    def update_alias(self, alias: str, key: str) -> None:
        self.both(
            "UpdateAlias",
            lambda _: self.model.update_alias(alias, key),
            lambda: self.ledger.update_alias(caller=CALLER, alias_name=alias, target_key_id=key),
        )

    @rule(alias=st.sampled_from(ALIAS_POOL))
    def delete_alias(self, alias: str) -> None:
        self.both(
            "DeleteAlias",
            lambda _: self.model.delete_alias(alias),
            lambda: self.ledger.delete_alias(caller=CALLER, alias_name=alias),
        )

    # ------------------------------------------------------------------ grants

    @rule(target=grants, key=keys, name=st.sampled_from(GRANT_NAMES))
    def create_grant(self, key: str, name: str | None) -> Any:
        out = self.both(
            "CreateGrant",
            lambda resp: self.model.create_grant(
                key, name=name, grant_id=None if resp is None else resp["GrantId"]
            ),
            lambda: self.ledger.create_grant(
                caller=CALLER,
                key_id=key,
                grantee_principal=GRANTEE,
                operations=["Encrypt", "Decrypt"],
                name=name,
            ),
        )
        if out is None:
            return multiple()
        return IssuedGrant(key_id=key, grant_id=out["GrantId"], token=out["GrantToken"])

    @rule(grant=grants)
    def retire_grant_by_token(self, grant: IssuedGrant) -> None:
        self.both(
            "RetireGrant",
            lambda _: self.model.retire_grant_by_token(grant.key_id, grant.grant_id),
            lambda: self.ledger.retire_grant(caller=CALLER, grant_token=grant.token),
        )

    @rule(grant=grants)
    def revoke_grant(self, grant: IssuedGrant) -> None:
        self.both(
            "RevokeGrant",
            lambda _: self.model.revoke_grant(grant.key_id, grant.grant_id),
            lambda: self.ledger.revoke_grant(
                caller=CALLER, key_id=grant.key_id, grant_id=grant.grant_id
            ),
        )

    # ------------------------------------------------------------------ checks

    @invariant()
    def catalog_matches_model(self) -> None:
        for key_id in self.model.keys:
            try:
                expected: dict[str, object] | None = self.model.describe_key(key_id)
            except KmsError:
                expected = None
            try:
                md = self.catalog.describe_key(UUID(key_id), self.arn(key_id))["KeyMetadata"]
            except NotFoundError:
                actual = None
            else:
                actual = {
                    "KeyState": md["KeyState"],
                    "Enabled": md["Enabled"],
                    "Description": md["Description"],
                    "DeletionDate": md.get("DeletionDate"),
                    "PendingDeletionWindowInDays": md.get("PendingDeletionWindowInDays"),
                }
            assert actual == expected, f"DescribeKey {key_id}"
            if expected is not None:
                rotations = self.ledger.list_key_rotations(caller=CALLER, key_id=key_id)
                types = [r["RotationType"] for r in rotations["Rotations"]]
                assert types == self.model.list_key_rotations(key_id), f"ListKeyRotations {key_id}"
        listed = {a["AliasName"]: a["TargetKeyId"] for a in self.catalog.list_aliases()["Aliases"]}
        assert listed == self.model.aliases

    def teardown(self) -> None:
        try:
            verify_chain(self.ledger.db.iter_chain(), self.ledger.db.iter_events())
            snapshot = self.catalog.snapshot()
            self.catalog.rebuild()
            assert self.catalog.snapshot() == snapshot
        finally:
            self.ledger.close()
            self._drop()


def test_key_lifecycle_matches_the_aws_model(
    ledger_settings: Settings, softhsm_keystore: Pkcs11KeyStore, tmp_path: Path
) -> None:
    factory = LedgerFactory(ledger_settings, softhsm_keystore, tmp_path)
    started = time.monotonic()
    run_state_machine_as_test(
        lambda: LifecycleMachine(factory),  # type: ignore[arg-type]  # a factory is documented
        settings=hypothesis.settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
    print(f"{EXAMPLES} examples x {STEPS} steps in {time.monotonic() - started:.1f}s")
