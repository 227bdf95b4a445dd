"""The audit relay: follows the ledger and publishes one CloudTrail record per event.

Guarantee: every ledger record reaches the audit topic exactly once with respect to
its ``seq``, in per-key order, across relay crashes and broker outages, provided that
only one relay runs per ledger and topic at a time.

How:

* The partition of a record is computed here (kafka-python's murmur2 default
  partitioner over the Kafka key) and passed to ``send`` explicitly, so the
  de-duplication below and the publisher always agree on where a record lives.
* The producer is idempotent (``enable_idempotence=True``, ``acks="all"``, one request
  in flight), so broker-side retries neither duplicate nor reorder within a partition,
  and records of a partition land in ``seq`` order.
* Before publishing anything (at start and after any failure), the relay reads the last
  record of every partition and learns the highest ``seq`` already there. A record
  whose ``seq`` is not above its partition's highest is skipped, not sent again.
* The follower position is saved only after the whole batch is flushed and every
  send is confirmed. A crash between the two just replays the batch, which the
  previous point turns into no-ops.

Record values are never logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.partitioner.default import murmur2

from consumers.cloudtrail import cloudtrail_record
from ledger.records import LedgerReader, LedgerRecord, PositionStore

log = logging.getLogger(__name__)

AUDIT_TOPIC = "keyledger.audit.v1"
CHECKPOINT_TOPIC = "keyledger.audit.checkpoints.v1"
DEFAULT_PARTITIONS = 3
SEQ_HEADER = "seq"
HASH_HEADER = "recordHash"


class RelayError(RuntimeError):
    """The relay cannot keep its exactly-once guarantee and stopped publishing.

    Raised for a gap or disorder in the ledger's ``seq``, a topic with non-contiguous
    partition ids, or a published record without a valid ``seq`` header. Broker
    trouble (unreachable, timeouts) is a KafkaError instead, which is retryable.
    """


class SendFuture(Protocol):
    def get(self, timeout: float | None = None) -> Any:
        """The send result; raises the send's error (a KafkaError) if it failed."""
        ...


class AuditProducer(Protocol):
    """The part of ``kafka.KafkaProducer`` the relay uses."""

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> SendFuture: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


def partition_for(key: bytes, partitions: int) -> int:
    """The partition kafka-python's (and Java's) default partitioner picks for ``key``."""
    if partitions < 1:
        raise ValueError("a topic has at least one partition")
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def message_key(event: dict[str, Any], ledger_id: str) -> bytes:
    """The Kafka key: the resolved key ARN, or the ledger id for events without a key."""
    key_arn = event.get("key_arn")
    return (key_arn or ledger_id).encode("utf-8")


def message_value(
    record: LedgerRecord, ledger_id: str, event: dict[str, Any] | None = None
) -> bytes:
    """The published value: the enveloped CloudTrail record as JSON with sorted keys.

    ``event`` is ``record.event()`` when the caller already decoded it.
    Raises KeyError or ValueError (from :func:`cloudtrail_record`) for a malformed event.
    """
    envelope = cloudtrail_record(
        record.event() if event is None else event,
        seq=record.seq,
        record_hash=record.record_hash,
        prev=record.prev,
        ledger_id=ledger_id,
    )
    return orjson.dumps(envelope, option=orjson.OPT_SORT_KEYS)


def message_headers(record: LedgerRecord) -> list[tuple[str, bytes]]:
    return [
        (SEQ_HEADER, str(record.seq).encode("ascii")),
        (HASH_HEADER, record.record_hash.hex().encode("ascii")),
    ]


def header_seq(headers: Sequence[tuple[str, bytes]] | None) -> int:
    """The ``seq`` header of a published record. Raises RelayError if missing or invalid."""
    for name, value in headers or ():
        if name == SEQ_HEADER:
            try:
                return int(value.decode("ascii"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise RelayError("published record has an invalid seq header") from exc
    raise RelayError("published record has no seq header")


class AuditRelay:
    """Publishes ledger records to the audit topic, exactly once per ``seq``.

    Connections are opened lazily by the first :meth:`run_once`, never by the
    constructor. Not thread-safe: drive one instance from one thread.
    """

    def __init__(
        self,
        *,
        reader: LedgerReader,
        positions: PositionStore,
        bootstrap: str,
        ledger_id: str,
        position_name: str | None = None,
        batch_size: int = 500,
        producer_factory: Callable[[], AuditProducer] | None = None,
        topic: str = AUDIT_TOPIC,
        checkpoint_topic: str = CHECKPOINT_TOPIC,
        partitions: int = DEFAULT_PARTITIONS,
        crash_after_publish: Callable[[int], None] | None = None,
        send_timeout: float = 30.0,
        scan_timeout: float = 30.0,
        checkpoints: Callable[[int], Sequence[tuple[int, int, str]]] | None = None,
    ) -> None:
        """Configure the relay; opens no connection.

        ``position_name`` defaults to ``"relay:" + topic``. ``partitions`` is used only
        when the relay creates the topic; an existing topic keeps its own count.
        ``crash_after_publish`` (for tests) is called with the batch's last ``seq``
        after the batch is confirmed and before the position is saved.

        ``checkpoints(after_id)`` returns stored checkpoints ``(id, size, note)`` with
        larger ids; each is published to ``checkpoint_topic`` (one partition, keyed by
        the ledger id, header ``checkpoint``) once every record it covers is on the
        audit topic. A crash between publishing and saving the position may publish a
        checkpoint again; its ``id`` tells copies apart.

        Raises ValueError for a non-positive ``batch_size`` or ``partitions``.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if partitions < 1:
            raise ValueError("partitions must be positive")
        self._reader = reader
        self._positions = positions
        self._bootstrap = bootstrap
        self._ledger_id = ledger_id
        self._topic = topic
        self._checkpoint_topic = checkpoint_topic
        self._position_name = position_name or f"relay:{topic}"
        self._batch_size = batch_size
        self._producer_factory = producer_factory or self._default_producer
        self._partitions_wanted = partitions
        self._crash_after_publish = crash_after_publish
        self._send_timeout = send_timeout
        self._scan_timeout = scan_timeout
        self._checkpoints = checkpoints
        self._producer: AuditProducer | None = None
        self._partitions: int | None = None
        # Highest seq already on each partition; None means "unknown, scan first".
        self._published: dict[int, int] | None = None

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def position_name(self) -> str:
        return self._position_name

    def run_once(self) -> int:
        """Publish every record up to the ledger head seen at the call; return how many.

        Records already on the topic are skipped and not counted. The position is
        saved after each confirmed batch.

        Raises KafkaError (broker unreachable, send failed or timed out), RelayError
        (see the class), or whatever the reader, position store or
        ``crash_after_publish`` raise. After any exception the relay re-learns what
        is on the topic before its next publish, so calling again is safe.
        """
        try:
            return self._run_once()
        except BaseException:
            self._reset()
            raise

    def _run_once(self) -> int:
        sent = self._publish_records()
        if self._checkpoints is not None:
            self._publish_checkpoints()
        return sent

    def _publish_checkpoints(self) -> None:
        assert self._checkpoints is not None
        name = f"{self._position_name}:checkpoints"
        done = self._positions.get_position(name)
        covered = self._positions.get_position(self._position_name)
        todo = [c for c in self._checkpoints(done) if c[1] <= covered]
        if not todo:
            return
        producer, _, _ = self._ensure_ready()
        futures = []
        for cp_id, size, note in todo:
            value = orjson.dumps(
                {"ledger": self._ledger_id, "id": cp_id, "size": size, "note": note},
                option=orjson.OPT_SORT_KEYS,
            )
            futures.append(
                producer.send(
                    self._checkpoint_topic,
                    value=value,
                    key=self._ledger_id.encode(),
                    headers=[("checkpoint", str(cp_id).encode())],
                    partition=0,
                )
            )
        producer.flush(timeout=self._send_timeout)
        for future in futures:
            future.get(timeout=self._send_timeout)
        self._positions.set_position(name, todo[-1][0])

    def _publish_records(self) -> int:
        head = self._reader.head_seq()
        position = self._positions.get_position(self._position_name)
        if position >= head:
            return 0
        producer, published, partitions = self._ensure_ready()
        sent_total = 0
        while position < head:
            records = self._reader.read_records(position, min(self._batch_size, head - position))
            if not records:
                raise RelayError(f"ledger head is {head} but no records follow position {position}")
            futures: list[tuple[int, int, SendFuture]] = []
            expected = position + 1
            for record in records:
                if record.seq != expected:
                    raise RelayError(f"ledger seq gap: expected {expected}, got {record.seq}")
                expected += 1
                event = record.event()
                key = message_key(event, self._ledger_id)
                partition = partition_for(key, partitions)
                if record.seq <= published.get(partition, 0):
                    continue
                future = producer.send(
                    self._topic,
                    value=message_value(record, self._ledger_id, event),
                    key=key,
                    headers=message_headers(record),
                    partition=partition,
                )
                futures.append((record.seq, partition, future))
            producer.flush(timeout=self._send_timeout)
            for seq, partition, future in futures:
                future.get(timeout=self._send_timeout)
                published[partition] = max(published.get(partition, 0), seq)
            last = records[-1].seq
            if self._crash_after_publish is not None:
                self._crash_after_publish(last)
            self._positions.set_position(self._position_name, last)
            log.debug(
                "relay %s: published %d of records %d..%d",
                self._topic,
                len(futures),
                records[0].seq,
                last,
            )
            sent_total += len(futures)
            position = last
        return sent_total

    def run_forever(self, poll_interval: float, stop: threading.Event) -> None:
        """Call :meth:`run_once` every ``poll_interval`` seconds until ``stop`` is set.

        Broker errors (KafkaError) are logged and retried with a capped backoff; any
        other exception (RelayError, reader or position store failures) propagates.
        """
        backoff = poll_interval
        while not stop.is_set():
            try:
                self.run_once()
            except KafkaError as exc:
                log.warning(
                    "relay %s: broker error %s, retrying in %.1f s",
                    self._topic,
                    type(exc).__name__,
                    backoff,
                )
                stop.wait(backoff)
                backoff = min(max(backoff * 2, 0.1), 30.0)
                continue
            backoff = poll_interval
            stop.wait(poll_interval)

    def close(self) -> None:
        """Flush and close the producer. Safe to call more than once."""
        self._reset()

    def __enter__(self) -> AuditRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- connections ---------------------------------------------------------------

    def _ensure_ready(self) -> tuple[AuditProducer, dict[int, int], int]:
        if self._partitions is None:
            self._ensure_topics()
            self._partitions = self._partition_count()
        if self._published is None:
            self._published = self._scan_published(self._partitions)
        if self._producer is None:
            self._producer = self._producer_factory()
        return self._producer, self._published, self._partitions

    def _reset(self) -> None:
        """Forget what is known about the topic and close the producer.

        Closing waits for requests already in flight (up to ``send_timeout``) so that
        the next scan sees everything this producer will ever write.
        """
        self._published = None
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=self._send_timeout)
            except Exception:  # closing is best effort; the scan is the source of truth
                log.warning("relay %s: producer close failed", self._topic, exc_info=True)

    def _default_producer(self) -> AuditProducer:
        producer: AuditProducer = KafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=f"keyledger-relay-{self._ledger_id}",
            enable_idempotence=True,
            acks="all",
            max_in_flight_requests_per_connection=1,
            linger_ms=5,
            batch_size=256 * 1024,
        )
        return producer

    def _ensure_topics(self) -> None:
        admin = KafkaAdminClient(
            bootstrap_servers=self._bootstrap, client_id="keyledger-relay-admin"
        )
        try:
            existing = set(admin.list_topics())
            for name, count in (
                (self._topic, self._partitions_wanted),
                (self._checkpoint_topic, 1),
            ):
                if name in existing:
                    continue
                try:
                    admin.create_topics([NewTopic(name, count, 1)])
                    log.info("relay: created topic %s with %d partitions", name, count)
                except TopicAlreadyExistsError:
                    pass
        finally:
            admin.close()

    def _new_consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id="keyledger-relay-scan",
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
        )

    def _partition_count(self) -> int:
        consumer = self._new_consumer()
        try:
            deadline = time.monotonic() + self._scan_timeout
            while True:
                ids = consumer.partitions_for_topic(self._topic)
                if ids:
                    if sorted(ids) != list(range(len(ids))):
                        raise RelayError(f"topic {self._topic} has non-contiguous partitions")
                    return len(ids)
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError(f"no partition metadata for topic {self._topic}")
                time.sleep(0.1)
        finally:
            consumer.close()

    def _scan_published(self, partitions: int) -> dict[int, int]:
        """The highest ``seq`` on each partition (0 for an empty one).

        Reads from one before the reported end offset up to the fetch high-water
        mark. On Apache Kafka that is the last record; Tansu reports the end offset
        as the last *batch's* base offset + 1, so there this reads the whole last
        batch. Raises KafkaTimeoutError if the tail cannot be read within
        ``scan_timeout``, RelayError for a record without a valid ``seq`` header.
        """
        consumer = self._new_consumer()
        try:
            tps = [TopicPartition(self._topic, p) for p in range(partitions)]
            consumer.assign(tps)
            ends = consumer.end_offsets(tps, timeout_ms=int(self._scan_timeout * 1000))
            published = dict.fromkeys(range(partitions), 0)
            pending: set[TopicPartition] = set()
            for tp in tps:
                end = ends.get(tp, 0)
                if end > 0:
                    consumer.seek(tp, end - 1)
                    pending.add(tp)
                else:
                    consumer.pause(tp)
            seen: set[TopicPartition] = set()
            deadline = time.monotonic() + self._scan_timeout
            while pending:
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError(
                        f"could not read the tail of {len(pending)} partition(s) of "
                        f"{self._topic} within {self._scan_timeout:.0f} s"
                    )
                for tp, messages in consumer.poll(timeout_ms=200).items():
                    for message in messages:
                        seq = header_seq(message.headers)
                        published[tp.partition] = max(published[tp.partition], seq)
                        seen.add(tp)
                for tp in list(pending):
                    highwater = consumer.highwater(tp)
                    if tp in seen and highwater is not None and consumer.position(tp) >= highwater:
                        pending.discard(tp)
                        consumer.pause(tp)
            log.info("relay %s: highest published seq per partition %s", self._topic, published)
            return published
        finally:
            consumer.close()


@dataclass(frozen=True)
class PublishedRecord:
    """One record read back from a topic (for tests, the demo and SIEM-copy checks)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes = field(repr=False)
    headers: dict[str, bytes]


def read_topic(bootstrap: str, topic: str, *, timeout: float = 30.0) -> list[PublishedRecord]:
    """Every record currently on ``topic``, partition by partition in offset order.

    Uses a fresh group-less consumer from the earliest offset without committing
    anything, and stops when every partition is read up to its fetch high-water mark.
    Raises RelayError if the topic has no partitions, KafkaTimeoutError if the end
    is not reached within ``timeout``, KafkaError if the broker is unreachable.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="keyledger-topic-reader",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
    )
    try:
        ids = consumer.partitions_for_topic(topic)
        if not ids:
            raise RelayError(f"topic {topic} has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(ids)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        found: list[PublishedRecord] = []
        pending = set(tps)
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"could not read {topic} to its end within {timeout:.0f} s")
            for tp, messages in consumer.poll(timeout_ms=100).items():
                found.extend(
                    PublishedRecord(
                        partition=tp.partition,
                        offset=m.offset,
                        key=m.key,
                        value=m.value,
                        headers=dict(m.headers or ()),
                    )
                    for m in messages
                )
            for tp in list(pending):
                highwater = consumer.highwater(tp)
                if highwater is not None and consumer.position(tp) >= highwater:
                    pending.discard(tp)
        found.sort(key=lambda r: (r.partition, r.offset))
        return found
    finally:
        consumer.close()
