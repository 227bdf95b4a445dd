"""The audit relay against a real Kafka-protocol broker (Tansu, in memory)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import orjson
import pytest

from consumers.broker import TansuBroker
from consumers.relay import (
    AUDIT_TOPIC,
    HASH_HEADER,
    SEQ_HEADER,
    VIEW_TOPICS,
    AuditRelay,
    PublishedRecord,
    RelayError,
    read_topic,
    relay_status,
)
from ledger.records import LedgerRecord
from tests.fakes_relay import (
    BASE_TIME,
    WRAPPED_B64,
    InMemoryLedger,
    InMemoryPositions,
    RecordingProducer,
    mixed_events,
)

pytestmark = pytest.mark.kafka

N = 200
LEDGER_ID = "ledger-relay-test"


class SimulatedCrashError(Exception):
    pass


@pytest.fixture
def topic() -> str:
    """A fresh topic per test on the shared session broker."""
    return f"{AUDIT_TOPIC}.test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def ledger() -> InMemoryLedger:
    ledger = InMemoryLedger()
    ledger.extend(mixed_events(N, keys=5))
    return ledger


@pytest.fixture
def positions() -> InMemoryPositions:
    return InMemoryPositions()


def _relay(
    broker: TansuBroker,
    ledger: InMemoryLedger,
    positions: InMemoryPositions,
    topic: str,
    **kwargs: object,
) -> AuditRelay:
    return AuditRelay(
        reader=ledger,
        positions=positions,
        bootstrap=broker.bootstrap,
        ledger_id=LEDGER_ID,
        topic=topic,
        checkpoint_topic=f"{topic}.checkpoints",
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def relay(
    kafka_broker: TansuBroker,
    ledger: InMemoryLedger,
    positions: InMemoryPositions,
    topic: str,
) -> Iterator[AuditRelay]:
    relay = _relay(kafka_broker, ledger, positions, topic, batch_size=64)
    yield relay
    relay.close()


def _seqs(records: list[PublishedRecord]) -> list[int]:
    return [int(r.headers[SEQ_HEADER]) for r in records]


def _assert_exactly_once_in_key_order(records: list[PublishedRecord], n: int) -> None:
    seqs = _seqs(records)
    assert len(seqs) == n
    assert sorted(seqs) == list(range(1, n + 1))
    by_key: dict[bytes | None, list[int]] = defaultdict(list)
    partition_of_key: dict[bytes | None, set[int]] = defaultdict(set)
    for record in records:  # partition by partition, in offset order
        by_key[record.key].append(int(record.headers[SEQ_HEADER]))
        partition_of_key[record.key].add(record.partition)
    for key, key_seqs in by_key.items():
        assert key_seqs == sorted(key_seqs), f"out of order for {key!r}"
        assert len(partition_of_key[key]) == 1


def test_every_ledger_record_is_published_once_in_per_key_order(
    kafka_broker: TansuBroker, relay: AuditRelay, ledger: InMemoryLedger, topic: str
) -> None:
    assert relay.run_once() == N
    records = read_topic(kafka_broker.bootstrap, topic)
    _assert_exactly_once_in_key_order(records, N)
    keys = {r.key for r in records}
    assert len(keys) == 6  # five key ARNs plus the ledger id for calls on unknown keys
    assert LEDGER_ID.encode() in keys
    assert {r.partition for r in records} == {0, 1, 2}
    for r in records:
        seq = int(r.headers[SEQ_HEADER])
        assert r.headers[HASH_HEADER] == ledger.record(seq).record_hash.hex().encode()


def test_a_crash_between_publish_and_position_save_publishes_nothing_twice(
    kafka_broker: TansuBroker,
    ledger: InMemoryLedger,
    positions: InMemoryPositions,
    topic: str,
) -> None:
    def crash_on_second_batch(last_seq: int) -> None:
        if last_seq > 50:
            raise SimulatedCrashError(last_seq)

    crashing = _relay(
        kafka_broker,
        ledger,
        positions,
        topic,
        batch_size=50,
        crash_after_publish=crash_on_second_batch,
    )
    with pytest.raises(SimulatedCrashError):
        crashing.run_once()
    crashing.close()
    assert positions.get_position(crashing.position_name) == 50
    assert len(read_topic(kafka_broker.bootstrap, topic)) == 100

    restarted = _relay(kafka_broker, ledger, positions, topic, batch_size=50)
    try:
        assert restarted.run_once() == N - 100
    finally:
        restarted.close()
    assert positions.get_position(restarted.position_name) == N
    _assert_exactly_once_in_key_order(read_topic(kafka_broker.bootstrap, topic), N)


def test_a_lost_position_is_recovered_from_the_topic(
    kafka_broker: TansuBroker,
    ledger: InMemoryLedger,
    relay: AuditRelay,
    topic: str,
) -> None:
    assert relay.run_once() == N
    fresh = _relay(kafka_broker, ledger, InMemoryPositions(), topic, batch_size=64)
    try:
        assert fresh.run_once() == 0
    finally:
        fresh.close()
    assert len(read_topic(kafka_broker.bootstrap, topic)) == N


def test_running_twice_publishes_nothing_the_second_time(
    kafka_broker: TansuBroker, relay: AuditRelay, ledger: InMemoryLedger, topic: str
) -> None:
    assert relay.run_once() == N
    assert relay.run_once() == 0
    ledger.extend(mixed_events(N + 3)[N:])
    assert relay.run_once() == 3
    _assert_exactly_once_in_key_order(read_topic(kafka_broker.bootstrap, topic), N + 3)


def test_published_value_is_the_enveloped_view_without_material(
    kafka_broker: TansuBroker, relay: AuditRelay, ledger: InMemoryLedger, topic: str
) -> None:
    relay.run_once()
    records = read_topic(kafka_broker.bootstrap, topic)
    for r in records:
        assert b'"material"' not in r.value
        assert WRAPPED_B64.encode() not in r.value
    first = next(r for r in records if r.headers[SEQ_HEADER] == b"1")
    value = orjson.loads(first.value)
    assert set(value) == {"ledger", "seq", "recordHash", "prev", "record"}
    assert value["ledger"] == LEDGER_ID
    assert value["seq"] == 1
    assert value["recordHash"] == ledger.record(1).record_hash.hex()
    assert value["prev"] == "00" * 32
    assert value["record"]["eventName"] == "CreateKey"
    assert first.key == value["record"]["resources"][0]["ARN"].encode()


def test_run_forever_follows_new_records_until_stopped(
    kafka_broker: TansuBroker,
    relay: AuditRelay,
    ledger: InMemoryLedger,
    positions: InMemoryPositions,
    topic: str,
) -> None:
    stop = threading.Event()
    worker = threading.Thread(target=relay.run_forever, args=(0.02, stop), daemon=True)
    worker.start()
    try:
        ledger.extend(mixed_events(N + 10)[N:])
        deadline = time.monotonic() + 10
        while positions.get_position(relay.position_name) < N + 10:
            assert time.monotonic() < deadline, "relay did not catch up"
            time.sleep(0.02)
    finally:
        stop.set()
        worker.join(timeout=10)
    assert not worker.is_alive()
    _assert_exactly_once_in_key_order(read_topic(kafka_broker.bootstrap, topic), N + 10)


def test_a_gap_in_the_ledger_stops_the_relay(
    kafka_broker: TansuBroker, positions: InMemoryPositions, topic: str
) -> None:
    class GappyLedger(InMemoryLedger):
        def read_records(self, after_seq: int, limit: int) -> Sequence[LedgerRecord]:
            return [r for r in super().read_records(after_seq, limit) if r.seq != 3]

    gappy = GappyLedger()
    gappy.extend(mixed_events(5))
    relay = _relay(kafka_broker, gappy, positions, topic)
    try:
        with pytest.raises(RelayError, match="gap"):
            relay.run_once()
    finally:
        relay.close()
    assert positions.get_position(relay.position_name) == 0


def _carries_seq_and_hash(value: bytes, seq: int, record_hash: str) -> bool:
    """The view value names the record hash and, under some key, the seq."""
    found = False

    def walk(node: Any) -> None:
        nonlocal found
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("seq", "sequence") and v == seq:
                    found = True
                walk(v)

    walk(orjson.loads(value))
    return found and record_hash.encode() in value


@pytest.mark.parametrize("view", ["ocsf", "ecs", "hec"])
def test_a_view_goes_to_its_own_topic_once_per_seq_with_the_audit_keys_and_headers(
    kafka_broker: TansuBroker,
    ledger: InMemoryLedger,
    positions: InMemoryPositions,
    topic: str,
    view: str,
) -> None:
    audit = _relay(kafka_broker, ledger, positions, topic, batch_size=64)
    viewer = _relay(kafka_broker, ledger, positions, f"{topic}.{view}", view=view, batch_size=64)
    try:
        assert audit.run_once() == N
        assert positions.get_position(viewer.position_name) == 0  # its own position
        assert viewer.run_once() == N
        assert viewer.run_once() == 0
    finally:
        audit.close()
        viewer.close()
    assert viewer.view == view
    assert viewer.position_name == f"relay:{topic}.{view}"
    audit_records = read_topic(kafka_broker.bootstrap, topic)
    view_records = read_topic(kafka_broker.bootstrap, f"{topic}.{view}")
    _assert_exactly_once_in_key_order(view_records, N)
    key_of = {r.headers[SEQ_HEADER]: (r.key, r.partition) for r in audit_records}
    for r in view_records:
        seq = int(r.headers[SEQ_HEADER])
        assert key_of[r.headers[SEQ_HEADER]] == (r.key, r.partition)
        assert r.headers[HASH_HEADER] == ledger.record(seq).record_hash.hex().encode()
        assert _carries_seq_and_hash(r.value, seq, ledger.record(seq).record_hash.hex())
        assert WRAPPED_B64.encode() not in r.value
        assert b'"record":' not in r.value  # the view, not the CloudTrail envelope


def test_each_view_has_its_default_topic() -> None:
    assert VIEW_TOPICS == {
        "cloudtrail": "keyledger.audit.v1",
        "ocsf": "keyledger.audit.ocsf.v1",
        "ecs": "keyledger.audit.ecs.v1",
        "hec": "keyledger.audit.hec.v1",
    }
    with pytest.raises(ValueError, match="unknown view"):
        AuditRelay(
            reader=InMemoryLedger(),
            positions=InMemoryPositions(),
            bootstrap="127.0.0.1:1",
            ledger_id=LEDGER_ID,
            view="syslog",
        )


def test_unconfirmed_sends_stay_within_the_batch_count_and_byte_bounds(
    kafka_broker: TansuBroker,
    ledger: InMemoryLedger,
    positions: InMemoryPositions,
    topic: str,
) -> None:
    producer = RecordingProducer()
    max_bytes = 4000  # two or three CloudTrail records
    relay = _relay(
        kafka_broker,
        ledger,
        positions,
        topic,
        batch_size=10,
        max_batch_bytes=max_bytes,
        producer_factory=lambda: producer,
    )
    try:
        assert relay.run_once() == N
    finally:
        relay.close()
    largest = max(size for *_, size in producer.sent)
    assert [seq for _, seq, _, _ in producer.sent] == list(range(1, N + 1))
    batches = [o for o in producer.outstanding if o[0]]
    assert len(batches) > N // 10  # the byte bound cut batches short
    for sends, size in batches:
        assert sends <= 10
        assert size < max_bytes + largest
    assert positions.get_position(relay.position_name) == N


def test_status_shows_head_position_lag_and_the_topics_highest_seq(
    kafka_broker: TansuBroker,
    ledger: InMemoryLedger,
    positions: InMemoryPositions,
    topic: str,
) -> None:
    now = BASE_TIME + timedelta(hours=1)
    before = relay_status(
        reader=ledger, positions=positions, now=now, topic=topic, bootstrap=kafka_broker.bootstrap
    )
    assert (before.head_seq, before.position, before.lag_events) == (N, 0, N)
    assert before.lag_seconds == 3600.0  # the oldest unpublished record is seq 1
    assert before.topic_seq == 0 and before.broker_error is None  # no topic yet

    relay = _relay(kafka_broker, ledger, positions, topic, batch_size=64)
    try:
        relay.run_once()
        ledger.extend(mixed_events(N + 5)[N:])
        behind = relay_status(
            reader=ledger,
            positions=positions,
            now=now,
            topic=topic,
            bootstrap=kafka_broker.bootstrap,
        )
        assert (behind.position, behind.lag_events, behind.topic_seq) == (N, 5, N)
        oldest = BASE_TIME + timedelta(milliseconds=37 * N)
        assert behind.lag_seconds == round((now - oldest).total_seconds(), 3)
        relay.run_once()
    finally:
        relay.close()
    after = relay_status(
        reader=ledger, positions=positions, now=now, topic=topic, bootstrap=kafka_broker.bootstrap
    )
    assert (after.lag_events, after.lag_seconds, after.topic_seq) == (0, 0.0, N + 5)


def test_status_says_the_broker_is_unreachable_instead_of_failing() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    ledger = InMemoryLedger()
    ledger.extend(mixed_events(3))
    status = relay_status(
        reader=ledger,
        positions=InMemoryPositions(),
        now=BASE_TIME,
        view="ocsf",
        bootstrap=f"127.0.0.1:{closed_port}",
        timeout=1.0,
    )
    assert status.topic == "keyledger.audit.ocsf.v1"
    assert status.position_name == "relay:keyledger.audit.ocsf.v1"
    assert (status.head_seq, status.lag_events, status.lag_seconds) == (3, 3, 0.0)
    assert status.topic_seq is None
    assert status.broker_error is not None
    assert status.as_dict()["broker"] == "unreachable"
