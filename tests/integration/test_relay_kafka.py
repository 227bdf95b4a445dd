"""The audit relay against a real Kafka-protocol broker (Tansu, in memory)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence

import orjson
import pytest

from consumers.broker import TansuBroker
from consumers.relay import (
    AUDIT_TOPIC,
    HASH_HEADER,
    SEQ_HEADER,
    AuditRelay,
    PublishedRecord,
    RelayError,
    read_topic,
)
from ledger.records import LedgerRecord
from tests.fakes_relay import (
    WRAPPED_B64,
    InMemoryLedger,
    InMemoryPositions,
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
