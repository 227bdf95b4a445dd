"""Detections end to end: a real ledger (SoftHSM, SQLite) driven through KeyLedger with a
fixed clock, the real relay, a real broker, and the detection consumer group."""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from consumers.broker import TansuBroker
from consumers.detections import Alert, DetectionConsumer, DetectResult, load_rules
from consumers.relay import AuditRelay, read_topic
from ledger.bootstrap import open_ledger
from ledger.clock import FixedClock
from ledger.errors import KeyLedgerError
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings

pytestmark = [pytest.mark.softhsm, pytest.mark.kafka]

ACCOUNT = "111122223333"
ADMIN = Caller(principal=f"arn:aws:iam::{ACCOUNT}:root", source_ip="10.9.9.9")
START = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)
USE_KEYS = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"}]})  # fmt: skip


@dataclass
class World:
    ledger: KeyLedger
    clock: FixedClock
    bootstrap: str
    topic: str = field(default_factory=lambda: "keyledger.audit.it." + secrets.token_hex(4))
    alerts_topic: str = field(default_factory=lambda: "keyledger.alerts.it." + secrets.token_hex(4))
    group: str = field(default_factory=lambda: "detect-it-" + secrets.token_hex(4))
    printed: list[Alert] = field(default_factory=list)

    def tick(self, seconds: float = 30) -> None:
        self.clock.advance(timedelta(seconds=seconds))

    def seq(self) -> int:
        return self.ledger.db.head_seq()

    def user(self, name: str, ip: str, *, policy: str | None = USE_KEYS) -> Caller:
        self.ledger.create_principal(caller=ADMIN, name=name)
        if policy is not None:
            self.ledger.attach_principal_policy(
                caller=ADMIN, name=name, policy_name="use", policy=policy
            )
        return Caller(principal=f"arn:aws:iam::{ACCOUNT}:user/{name}", source_ip=ip)

    def key(self) -> str:
        arn: str = self.ledger.create_key(caller=ADMIN)["KeyMetadata"]["Arn"]
        return arn

    def imported_key(self, *, valid_days: int | None = None) -> str:
        """An EXTERNAL key with imported material (expiring after ``valid_days``)."""
        key_id: str = self.ledger.create_key(caller=ADMIN, origin="EXTERNAL")["KeyMetadata"][
            "KeyId"
        ]
        params = self.ledger.get_parameters_for_import(
            caller=ADMIN, key_id=key_id, wrapping_algorithm="RSAES_OAEP_SHA_256",
            wrapping_key_spec="RSA_2048",
        )  # fmt: skip
        public = serialization.load_der_public_key(params["PublicKey"])
        assert isinstance(public, rsa.RSAPublicKey)
        sha = hashes.SHA256()
        wrapped = public.encrypt(os.urandom(32), padding.OAEP(padding.MGF1(sha), sha, None))
        valid_to = None if valid_days is None else self.clock.now() + timedelta(days=valid_days)
        self.ledger.import_key_material(
            caller=ADMIN, key_id=key_id, import_token=params["ImportToken"],
            encrypted_key_material=wrapped, valid_to=valid_to,
        )  # fmt: skip
        return key_id

    def relay(self) -> None:
        with AuditRelay(
            reader=self.ledger.db,
            positions=self.ledger.db,
            bootstrap=self.bootstrap,
            ledger_id=self.ledger.ledger_id,
            topic=self.topic,
        ) as relay:
            relay.run_once()

    def detect(self) -> DetectResult:
        """One ``--once`` run of a fresh detector instance in the same group."""
        consumer = DetectionConsumer(
            bootstrap=self.bootstrap,
            rules=load_rules(),
            topic=self.topic,
            alerts_topic=self.alerts_topic,
            group=self.group,
            on_alert=self.printed.append,
        )
        return consumer.run(once=True)

    def alerts(self) -> list[dict[str, Any]]:
        return [orjson.loads(r.value) for r in read_topic(self.bootstrap, self.alerts_topic)]


@pytest.fixture
def world(
    tmp_path: Path, softhsm_keystore: Pkcs11KeyStore, kafka_broker: TansuBroker
) -> Iterator[World]:
    clock = FixedClock(START)
    ledger = open_ledger(Settings(data_dir=tmp_path / "data"), keystore=softhsm_keystore,
                         clock=clock)  # fmt: skip
    yield World(ledger=ledger, clock=clock, bootstrap=kafka_broker.bootstrap)
    ledger.close()


def refused(call: object) -> None:
    with pytest.raises(KeyLedgerError):
        call()  # type: ignore[operator]


def test_a_scripted_attack_fires_each_expected_rule_once_across_a_restart(world: World) -> None:
    w, led = world, world.ledger
    # Baseline: keys, a user who works from her usual address.
    k_disable, k_delete, k_policy, k_probe = (w.key() for _ in range(4))
    k_imported, k_expiring = w.imported_key(), w.imported_key(valid_days=1)
    alice = w.user("alice", "10.0.0.5")
    w.user("mallory", "198.51.100.66", policy=None)
    mallory = Caller(principal=f"arn:aws:iam::{ACCOUNT}:user/mallory", source_ip="198.51.100.66")
    blob = led.encrypt(caller=alice, key_id=k_disable, plaintext=b"p")["CiphertextBlob"]
    led.decrypt(caller=alice, ciphertext_blob=blob)
    w.tick(3600)
    expected: set[tuple[str, int]] = set()

    led.disable_key(caller=ADMIN, key_id=k_disable)
    expected.add(("kms_key_disabled", w.seq()))
    w.tick()
    led.schedule_key_deletion(caller=ADMIN, key_id=k_delete, pending_window_in_days=7)
    expected.add(("kms_key_scheduled_for_deletion", w.seq()))
    w.tick()
    opened = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": "kms:*", "Resource": "*"},
        {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt",
         "Resource": "*"}]})  # fmt: skip
    led.put_key_policy(caller=ADMIN, key_id=k_policy, policy=opened)
    expected.add(("kms_key_policy_opened", w.seq()))
    for _ in range(3):  # the burst starts ...
        w.tick(40)
        refused(lambda: led.encrypt(caller=mallory, key_id=k_probe, plaintext=b"x"))

    # ... the detector runs and is restarted mid-burst: its window must survive.
    w.relay()
    first_part = w.seq()
    assert w.detect() == DetectResult(evaluated=first_part, replayed=0, alerts=3)
    for _ in range(2):
        w.tick(40)
        refused(lambda: led.encrypt(caller=mallory, key_id=k_probe, plaintext=b"x"))
    expected.add(("kms_access_denied_burst", w.seq()))
    w.tick()
    refused(lambda: led.encrypt(caller=alice, key_id=k_delete, plaintext=b"x"))
    expected.add(("kms_disabled_key_use", w.seq()))
    refused(lambda: led.encrypt(caller=alice, key_id=k_disable, plaintext=b"x"))
    expected.add(("kms_disabled_key_use", w.seq()))
    w.tick()
    blob = led.encrypt(caller=alice, key_id=k_probe, plaintext=b"p")["CiphertextBlob"]
    led.decrypt(caller=alice, ciphertext_blob=blob)  # usual address: silent
    stranger = Caller(principal=alice.principal, source_ip="203.0.113.50")
    led.decrypt(caller=stranger, ciphertext_blob=blob)
    expected.add(("kms_decrypt_from_new_source_ip", w.seq()))
    led.decrypt(caller=stranger, ciphertext_blob=blob)  # now seen: silent
    w.tick()
    led.delete_imported_key_material(caller=ADMIN, key_id=k_imported)
    expected.add(("kms_imported_key_material_deleted", w.seq()))
    w.tick(2 * 86400)
    assert led.perform_due(uuid.UUID(k_expiring)) == ["DeleteExpiredKeyMaterial"]
    expected.add(("kms_imported_key_material_deleted", w.seq()))

    w.relay()
    assert w.detect() == DetectResult(
        evaluated=w.seq() - first_part, replayed=first_part, alerts=len(expected) - 3
    )
    # Nothing new: state rebuilt from every record, nothing re-emitted.
    assert w.detect() == DetectResult(evaluated=0, replayed=w.seq(), alerts=0)

    published = w.alerts()
    assert {(a["name"], a["seq"]) for a in published} == expected
    assert len(published) == len(expected)
    assert [a.to_json() for a in w.printed] == published
    records = {r.seq: r for r in led.db.read_records(0, w.seq())}
    burst = next(a for a in published if a["name"] == "kms_access_denied_burst")
    assert burst["principal"] == mallory.principal
    assert burst["correlatedSeqs"] == sorted(burst["correlatedSeqs"])
    assert len(burst["correlatedSeqs"]) == 5
    for alert in published:  # each alert maps back to its stored record
        assert alert["recordHash"] == records[alert["seq"]].record_hash.hex()
        assert alert["eventTime"] and alert["eventID"] and alert["level"]
    new_ip = next(a for a in published if a["name"] == "kms_decrypt_from_new_source_ip")
    assert new_ip["sourceIPAddress"] == "203.0.113.50"
    assert new_ip["keyArn"] == k_probe


def test_a_benign_day_of_traffic_fires_nothing(world: World) -> None:
    w, led = world, world.ledger
    keys = [w.key() for _ in range(3)]
    alice = w.user("alice", "10.0.0.5")
    bob = w.user("bob", "10.0.0.6")
    led.create_alias(caller=ADMIN, alias_name="alias/payroll", target_key_id=keys[0])
    led.enable_key_rotation(caller=ADMIN, key_id=keys[1])
    led.tag_resource(caller=ADMIN, key_id=keys[2], tags=[{"TagKey": "team", "TagValue": "hr"}])
    own = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": "kms:*", "Resource": "*"},
        {"Effect": "Allow", "Principal": {"AWS": alice.principal}, "Action": "kms:Decrypt",
         "Resource": "*"},
        {"Effect": "Deny", "Principal": "*", "Action": "kms:ScheduleKeyDeletion",
         "Resource": "*"}]})  # fmt: skip
    led.put_key_policy(caller=ADMIN, key_id=keys[2], policy=own)
    blobs = []
    for hour in range(8):
        w.tick(3600)
        for i, who in enumerate((alice, bob)):
            key = "alias/payroll" if i == 0 else keys[hour % 3]
            blobs.append(led.encrypt(caller=who, key_id=key, plaintext=b"data")["CiphertextBlob"])
            led.decrypt(caller=who, ciphertext_blob=blobs[-1])
        if hour == 3:
            led.rotate_key_on_demand(caller=ADMIN, key_id=keys[1])
            led.update_alias(caller=ADMIN, alias_name="alias/payroll", target_key_id=keys[1])
        if hour == 5:  # a misconfigured job: four denials in five minutes, not a burst
            for _ in range(4):
                w.tick(60)
                refused(lambda: led.schedule_key_deletion(caller=bob, key_id=keys[0]))
    for blob in blobs[:4]:
        led.decrypt(caller=alice, ciphertext_blob=blob)

    w.relay()
    assert w.seq() >= 50
    assert w.detect() == DetectResult(evaluated=w.seq(), replayed=0, alerts=0)
    assert w.alerts() == []
    assert w.printed == []


READ_KEYS = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["kms:DescribeKey", "kms:GetKeyPolicy", "kms:ListGrants"],
     "Resource": "*"}]})  # fmt: skip


def test_a_principal_reading_ten_keys_in_minutes_fires_reconnaissance_once(world: World) -> None:
    """Successful reads are records, so a quiet enumeration of keys is visible: ten
    distinct keys read by one principal in under ten minutes fire once; the admin
    reading the same keys an hour apart does not."""
    w, led = world, world.ledger
    keys = [w.key() for _ in range(11)]
    scout = w.user("scout", "10.0.0.7", policy=READ_KEYS)
    for key in keys[:6]:  # the admin, slowly: one key every 12 minutes
        w.tick(720)
        led.describe_key(caller=ADMIN, key_id=key)
    reads = (
        lambda k: led.describe_key(caller=scout, key_id=k),
        lambda k: led.get_key_policy(caller=scout, key_id=k),
        lambda k: led.list_grants(caller=scout, key_id=k),
    )
    for i, key in enumerate(keys[:9]):
        w.tick(20)
        reads[i % 3](key)
        led.describe_key(caller=scout, key_id=keys[0])  # the same key again: counted once
    w.tick(20)
    led.describe_key(caller=scout, key_id=keys[9])
    tenth = w.seq()
    led.describe_key(caller=scout, key_id=keys[10])  # the window restarted after the alert

    w.relay()
    assert w.detect() == DetectResult(evaluated=w.seq(), replayed=0, alerts=1)
    [alert] = w.alerts()
    assert (alert["name"], alert["seq"]) == ("kms_key_reconnaissance", tenth)
    assert alert["principal"] == scout.principal
    assert len(alert["correlatedSeqs"]) == 19


def test_the_cli_prints_one_json_line_per_alert_and_a_summary_on_stderr(world: World) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    w, led = world, world.ledger
    key = w.key()
    led.disable_key(caller=ADMIN, key_id=key)
    led.schedule_key_deletion(caller=ADMIN, key_id=key, pending_window_in_days=7)
    w.relay()
    args = ["consume", "detect", "--once", "--topic", w.topic, "--alerts-topic",
            w.alerts_topic, "--group", w.group]  # fmt: skip
    env = {"KEYLEDGER_KAFKA_BOOTSTRAP": w.bootstrap}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [(a["name"], a["seq"]) for a in lines] == [
        ("kms_key_disabled", w.seq() - 1),
        ("kms_key_scheduled_for_deletion", w.seq()),
    ]
    assert lines == w.alerts()
    assert f"evaluated {w.seq()} records" in result.stderr
    again = CliRunner().invoke(app, args, env=env)  # committed: nothing printed twice
    assert again.exit_code == 0 and again.stdout == ""


def test_a_running_detector_picks_up_records_published_after_it_started(world: World) -> None:
    import threading
    import time

    w, led = world, world.ledger
    consumer = DetectionConsumer(
        bootstrap=w.bootstrap, rules=load_rules(), topic=w.topic,
        alerts_topic=w.alerts_topic, group=w.group, on_alert=w.printed.append,
    )  # fmt: skip
    stop = threading.Event()
    runner = threading.Thread(target=consumer.run_forever, args=(stop,), daemon=True)
    runner.start()  # before the audit topic exists
    try:
        key = w.key()
        led.disable_key(caller=ADMIN, key_id=key)
        w.relay()
        deadline = time.monotonic() + 20
        while not w.printed and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        runner.join(timeout=10)
    assert not runner.is_alive()
    assert [(a.rule_name, a.seq) for a in w.printed] == [("kms_key_disabled", w.seq())]
    assert [a["seq"] for a in w.alerts()] == [w.seq()]
