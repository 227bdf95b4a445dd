"""Checkpoint cadence (every N events, every N seconds, a heartbeat when idle) and the
relay's checkpoint topic, on a real ledger and a real broker."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from consumers.broker import TansuBroker
from consumers.relay import AuditRelay, read_topic
from ledger import audit
from ledger.bootstrap import open_ledger
from ledger.clock import FixedClock
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.offline_verify import parse_checkpoint, parse_verifier_keys, verify_note
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def timed(
    ledger_settings: Settings, softhsm_keystore: Pkcs11KeyStore
) -> Iterator[tuple[KeyLedger, FixedClock]]:
    clock = FixedClock(T0)
    settings = dataclasses.replace(
        ledger_settings,
        checkpoint_every_events=5,
        checkpoint_every_seconds=60,
        checkpoint_heartbeat_seconds=600,
    )
    app = open_ledger(settings, keystore=softhsm_keystore, clock=clock)
    yield app, clock
    app.close()


def test_checkpoints_fall_due_by_events_interval_and_heartbeat(
    timed: tuple[KeyLedger, FixedClock],
) -> None:
    ledger, clock = timed
    assert audit.checkpoint_due(ledger, clock.now()) is None  # empty ledger
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    assert audit.checkpoint_due(ledger, clock.now()) == "events"  # the first one
    audit.make_checkpoint(ledger)
    assert audit.checkpoint_due(ledger, clock.now()) is None
    for _ in range(4):
        ledger.encrypt(caller=CALLER, key_id=key, plaintext=b"x")
    assert audit.checkpoint_due(ledger, clock.now()) is None  # 4 < 5 events, 0 s
    ledger.encrypt(caller=CALLER, key_id=key, plaintext=b"x")
    assert audit.checkpoint_due(ledger, clock.now()) == "events"
    audit.make_checkpoint(ledger)
    ledger.encrypt(caller=CALLER, key_id=key, plaintext=b"x")
    clock.advance(timedelta(seconds=59))
    assert audit.checkpoint_due(ledger, clock.now()) is None
    clock.advance(timedelta(seconds=1))
    assert audit.checkpoint_due(ledger, clock.now()) == "interval"
    cp3 = audit.make_checkpoint(ledger)
    clock.advance(timedelta(seconds=599))
    assert audit.checkpoint_due(ledger, clock.now()) is None  # idle, before the heartbeat
    clock.advance(timedelta(seconds=1))
    assert audit.checkpoint_due(ledger, clock.now()) == "heartbeat"
    cp4 = audit.make_checkpoint(ledger)
    assert (cp4.size, cp4.root) == (cp3.size, cp3.root)  # same tree, a newer signed time
    assert cp4.note != cp3.note
    body = parse_checkpoint(cp4.note.split("\n\n", 1)[0] + "\n")
    assert body.extensions == [f"time {clock.now().isoformat()}"]
    assert [c.size for c in audit.checkpoints(ledger.db)] == [1, 6, 7, 7]


@pytest.mark.kafka
def test_the_relay_publishes_each_checkpoint_after_the_records_it_covers(
    ledger: KeyLedger, kafka_broker: TansuBroker
) -> None:
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    ledger.encrypt(caller=CALLER, key_id=key, plaintext=b"x")
    audit.make_checkpoint(ledger)
    topic = "keyledger.audit.cp." + secrets.token_hex(4)

    def relay() -> AuditRelay:
        return AuditRelay(
            reader=ledger.db,
            positions=ledger.db,
            bootstrap=kafka_broker.bootstrap,
            ledger_id=ledger.ledger_id,
            topic=topic,
            checkpoint_topic=topic + ".checkpoints",
            checkpoints=lambda after: [
                (c.id, c.size, c.note) for c in audit.checkpoints(ledger.db) if c.id > after
            ],
        )

    with relay() as r:
        assert r.run_once() == 2
    ledger.encrypt(caller=CALLER, key_id=key, plaintext=b"y")
    audit.make_checkpoint(ledger)
    with relay() as r:
        assert r.run_once() == 1
        assert r.run_once() == 0
    published = read_topic(kafka_broker.bootstrap, topic + ".checkpoints")
    values = [orjson.loads(m.value) for m in published]
    assert [(v["id"], v["size"]) for v in values] == [(1, 2), (2, 3)]
    keys = parse_verifier_keys("".join(k.vkey + "\n" for k in audit.signing_keys(ledger.db)))
    for v in values:
        assert v["ledger"] == ledger.ledger_id
        assert verify_note(v["note"], keys)
    assert [m.headers["checkpoint"] for m in published] == [b"1", b"2"]
