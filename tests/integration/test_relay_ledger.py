"""The audit relay on a real ledger (SQLite and PostgreSQL) and a real broker."""

from __future__ import annotations

import secrets
from collections import defaultdict

import orjson
import pytest

from consumers.broker import TansuBroker
from consumers.relay import AuditRelay, read_topic
from ledger.service import Caller, KeyLedger

pytestmark = [pytest.mark.softhsm, pytest.mark.kafka]

CALLER = Caller(principal="arn:aws:iam::111122223333:root")


class Crash(Exception):
    pass


def make_events(ledger: KeyLedger) -> int:
    keys = [ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"] for _ in range(4)]
    for i in range(60):
        ledger.encrypt(caller=CALLER, key_id=keys[i % 4], plaintext=b"x")
    ledger.disable_key(caller=CALLER, key_id=keys[0])
    with pytest.raises(Exception, match="disabled"):
        ledger.encrypt(caller=CALLER, key_id=keys[0], plaintext=b"x")
    return ledger.db.head_seq()


def test_relay_publishes_each_event_once_in_per_key_order_across_a_crash(
    ledger: KeyLedger, kafka_broker: TansuBroker
) -> None:
    n = make_events(ledger)
    topic = "keyledger.audit.it." + secrets.token_hex(4)

    def crash(last_seq: int) -> None:
        raise Crash(last_seq)

    def relay(**kw: object) -> AuditRelay:
        return AuditRelay(
            reader=ledger.db,
            positions=ledger.db,
            bootstrap=kafka_broker.bootstrap,
            ledger_id=ledger.ledger_id,
            topic=topic,
            batch_size=25,
            **kw,  # type: ignore[arg-type]
        )

    with relay(crash_after_publish=crash) as first, pytest.raises(Crash):
        first.run_once()  # published one batch, died before saving the position
    assert ledger.db.get_position("relay:" + topic) == 0
    with relay() as second:
        assert second.run_once() == n - 25
        assert second.run_once() == 0
    assert ledger.db.get_position("relay:" + topic) == n

    published = read_topic(kafka_broker.bootstrap, topic)
    values = [orjson.loads(r.value) for r in published]
    assert sorted(v["seq"] for v in values) == list(range(1, n + 1))
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for r, v in zip(published, values, strict=True):
        by_key[r.key or b""].append(v["seq"])
        assert r.headers["seq"] == str(v["seq"]).encode()
        assert v["ledger"] == ledger.ledger_id
        assert v["record"]["eventVersion"] == "1.11"
    for seqs in by_key.values():
        assert seqs == sorted(seqs)
    records = {r.seq: r for r in ledger.db.read_records(0, n)}
    for v in values:  # each SIEM copy maps back to its stored record
        assert v["recordHash"] == records[v["seq"]].record_hash.hex()
    failed = [v["record"] for v in values if v["record"].get("errorCode")]
    assert [f["errorCode"] for f in failed] == ["DisabledException"]
