"""The audit relay: follows the ledger and publishes one record per event to a topic.

Each relay publishes one view of the ledger to its own topic with its own position:
the enveloped CloudTrail record (``keyledger.audit.v1``), or the OCSF, ECS or Splunk
HEC view of that envelope (``keyledger.audit.{ocsf,ecs,hec}.v1``). Every view keeps the
Kafka key (resolved key ARN) and the headers ``seq`` and ``recordHash``.

Guarantee: every ledger record reaches the topic exactly once with respect to its
``seq``, in per-key order, across relay crashes and broker outages, provided that
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
* Memory is bounded under backpressure: a batch holds at most ``batch_size`` records
  and ``max_batch_bytes`` of values, and nothing more is read from the ledger until
  the batch is confirmed. In flight at any time: one produce request per broker
  connection, carrying at most one batch per partition, all within the current batch.
* Broker errors in :meth:`AuditRelay.run_forever` are retried with capped
  exponential backoff (with jitter); the retry starts again from the saved position,
  so no ``seq`` is ever skipped.

Known limit: a produce request the broker received from a relay that was killed
before the request was acknowledged can land after the next relay's scan only if the
broker takes longer than that relay's start-up to process it. A transactional
producer would close that window; the tail scan is used because it needs nothing
from the broker beyond idempotent produce.

Record values are never logged.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
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
DEFAULT_BATCH_SIZE = 1000
DEFAULT_MAX_BATCH_BYTES = 8 * 1024 * 1024
SEQ_HEADER = "seq"
HASH_HEADER = "recordHash"

CLOUDTRAIL_VIEW = "cloudtrail"
# The topic each view is published to by default.
VIEW_TOPICS: dict[str, str] = {
    CLOUDTRAIL_VIEW: AUDIT_TOPIC,
    "ocsf": "keyledger.audit.ocsf.v1",
    "ecs": "keyledger.audit.ecs.v1",
    "hec": "keyledger.audit.hec.v1",
}

ViewFunction = Callable[[dict[str, Any]], dict[str, Any]]

_PARTITION_CACHE_LIMIT = 100_000


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
    record: LedgerRecord,
    ledger_id: str,
    event: dict[str, Any] | None = None,
    *,
    view_fn: ViewFunction | None = None,
) -> bytes:
    """The published value as JSON with sorted keys: the enveloped CloudTrail record,
    or ``view_fn(envelope)`` (see :func:`view_function`).

    ``event`` is ``record.event()`` when the caller already decoded it.
    Raises KeyError or ValueError (from :func:`cloudtrail_record` or the view) for a
    malformed event.
    """
    envelope = cloudtrail_record(
        record.event() if event is None else event,
        seq=record.seq,
        record_hash=record.record_hash,
        prev=record.prev,
        ledger_id=ledger_id,
    )
    value = envelope if view_fn is None else view_fn(envelope)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


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


def view_function(view: str) -> ViewFunction | None:
    """The function that turns a CloudTrail envelope into ``view``'s value.

    ``None`` for ``"cloudtrail"`` (the envelope itself is published). The view modules
    are imported here, on first use. Raises ValueError for an unknown view name.
    """
    if view == CLOUDTRAIL_VIEW:
        return None
    if view == "ocsf":
        from consumers.views import ocsf_event

        return ocsf_event
    if view == "ecs":
        from consumers.views import ecs_document

        return ecs_document
    if view == "hec":
        from consumers.hec import hec_event

        return hec_event
    raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEW_TOPICS)}")


def producer_config(
    bootstrap: str, *, client_id: str, send_timeout: float = 30.0
) -> dict[str, Any]:
    """The relay's ``KafkaProducer`` settings (the benchmark's raw producer uses them too).

    Idempotent, ``acks="all"``, one request in flight per connection. A record that
    cannot be delivered fails within ``send_timeout`` seconds instead of the client's
    two-minute default, so a broker outage surfaces as a KafkaError the caller retries.
    """
    delivery_ms = int(send_timeout * 1000)
    return {
        "bootstrap_servers": bootstrap,
        "client_id": client_id,
        "enable_idempotence": True,
        "acks": "all",
        "max_in_flight_requests_per_connection": 1,
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "request_timeout_ms": max(1000, min(15_000, delivery_ms // 2)),
        "delivery_timeout_ms": delivery_ms,
        "max_block_ms": delivery_ms,
    }


class AuditRelay:
    """Publishes ledger records to one topic, exactly once per ``seq``.

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
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        producer_factory: Callable[[], AuditProducer] | None = None,
        topic: str | None = None,
        view: str = CLOUDTRAIL_VIEW,
        checkpoint_topic: str = CHECKPOINT_TOPIC,
        partitions: int = DEFAULT_PARTITIONS,
        crash_after_publish: Callable[[int], None] | None = None,
        send_timeout: float = 30.0,
        scan_timeout: float = 30.0,
        max_backoff: float = 5.0,
        checkpoints: Callable[[int], Sequence[tuple[int, int, str]]] | None = None,
    ) -> None:
        """Configure the relay; opens no connection.

        ``view`` is one of :data:`VIEW_TOPICS`; ``topic`` defaults to that view's topic
        and ``position_name`` to ``"relay:" + topic``, so each view has its own
        exactly-once position. ``partitions`` is used only when the relay creates the
        topic; an existing topic keeps its own count. A batch ends after
        ``batch_size`` records or once its values reach ``max_batch_bytes``.
        ``max_backoff`` caps the retry delay of :meth:`run_forever`.
        ``crash_after_publish`` (for tests) is called with the batch's last ``seq``
        after the batch is confirmed and before the position is saved.

        ``checkpoints(after_id)`` returns stored checkpoints ``(id, size, note)`` with
        larger ids; each is published to ``checkpoint_topic`` (one partition, keyed by
        the ledger id, header ``checkpoint``) once every record it covers is on the
        audit topic. A crash between publishing and saving the position may publish a
        checkpoint again; its ``id`` tells copies apart.

        Raises ValueError for a non-positive ``batch_size``, ``max_batch_bytes`` or
        ``partitions``, or an unknown ``view`` (the view's module is imported here).
        """
        if batch_size < 1 or max_batch_bytes < 1:
            raise ValueError("batch_size and max_batch_bytes must be positive")
        if partitions < 1:
            raise ValueError("partitions must be positive")
        self._view = view
        self._view_fn = view_function(view)
        topic = topic or VIEW_TOPICS[view]
        self._reader = reader
        self._positions = positions
        self._bootstrap = bootstrap
        self._ledger_id = ledger_id
        self._topic = topic
        self._checkpoint_topic = checkpoint_topic
        self._position_name = position_name or f"relay:{topic}"
        self._batch_size = batch_size
        self._max_batch_bytes = max_batch_bytes
        self._producer_factory = producer_factory or self._default_producer
        self._partitions_wanted = partitions
        self._crash_after_publish = crash_after_publish
        self._send_timeout = send_timeout
        self._scan_timeout = scan_timeout
        self._max_backoff = max_backoff
        self._checkpoints = checkpoints
        self._producer: AuditProducer | None = None
        self._partitions: int | None = None
        # Highest seq already on each partition; None means "unknown, scan first".
        self._published: dict[int, int] | None = None
        self._partition_of: dict[bytes, int] = {}

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def position_name(self) -> str:
        return self._position_name

    @property
    def view(self) -> str:
        return self._view

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
            batch_bytes = 0
            last = position
            for record in records:
                if record.seq != last + 1:
                    raise RelayError(f"ledger seq gap: expected {last + 1}, got {record.seq}")
                last = record.seq
                event = record.event()
                key = message_key(event, self._ledger_id)
                partition = self._partition(key, partitions)
                if record.seq <= published.get(partition, 0):
                    continue
                value = message_value(record, self._ledger_id, event, view_fn=self._view_fn)
                futures.append(
                    (
                        record.seq,
                        partition,
                        producer.send(
                            self._topic,
                            value=value,
                            key=key,
                            headers=message_headers(record),
                            partition=partition,
                        ),
                    )
                )
                batch_bytes += len(value)
                if batch_bytes >= self._max_batch_bytes:
                    break  # the rest of this read is read again next round
            producer.flush(timeout=self._send_timeout)
            for seq, partition, future in futures:
                future.get(timeout=self._send_timeout)
                published[partition] = max(published.get(partition, 0), seq)
            if self._crash_after_publish is not None:
                self._crash_after_publish(last)
            self._positions.set_position(self._position_name, last)
            log.debug(
                "relay %s: published %d of records %d..%d",
                self._topic,
                len(futures),
                position + 1,
                last,
            )
            sent_total += len(futures)
            position = last
        return sent_total

    def _partition(self, key: bytes, partitions: int) -> int:
        found = self._partition_of.get(key)
        if found is None:
            if len(self._partition_of) >= _PARTITION_CACHE_LIMIT:
                self._partition_of.clear()
            found = self._partition_of[key] = partition_for(key, partitions)
        return found

    def run_forever(self, poll_interval: float, stop: threading.Event) -> None:
        """Call :meth:`run_once` every ``poll_interval`` seconds until ``stop`` is set.

        Broker errors (KafkaError, OSError) are logged (type only) and retried after a
        delay that starts at ``min(poll_interval, 0.2)`` seconds and doubles up to
        ``max_backoff``, with up to 20 % jitter; each retry resumes from the saved
        position and re-learns the topic's tail first, so nothing is skipped or
        repeated. Any other exception (RelayError, reader or position store
        failures) propagates.
        """
        first = max(0.05, min(poll_interval, 0.2))
        backoff = first
        failures = 0
        while not stop.is_set():
            try:
                self.run_once()
            except (KafkaError, OSError) as exc:
                failures += 1
                delay = min(backoff, self._max_backoff) * random.uniform(0.8, 1.0)
                log.warning(
                    "relay %s: broker error %s (failure %d), retrying in %.1f s",
                    self._topic,
                    type(exc).__name__,
                    failures,
                    delay,
                )
                stop.wait(delay)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            if failures:
                log.info(
                    "relay %s: broker reachable again after %d failures", self._topic, failures
                )
            backoff, failures = first, 0
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
            **producer_config(
                self._bootstrap,
                client_id=f"keyledger-relay-{self._ledger_id}",
                send_timeout=self._send_timeout,
            )
        )
        return producer

    def _ensure_topics(self) -> None:
        admin = KafkaAdminClient(
            bootstrap_servers=self._bootstrap,
            client_id="keyledger-relay-admin",
            bootstrap_timeout_ms=int(self._scan_timeout * 1000),
        )
        try:
            existing = set(admin.list_topics())
            wanted = [(self._topic, self._partitions_wanted)]
            if self._checkpoints is not None:
                wanted.append((self._checkpoint_topic, 1))
            for name, count in wanted:
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
            bootstrap_timeout_ms=int(self._scan_timeout * 1000),
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
        consumer = self._new_consumer()
        try:
            published = scan_tail(consumer, self._topic, partitions, timeout=self._scan_timeout)
        finally:
            consumer.close()
        log.info("relay %s: highest published seq per partition %s", self._topic, published)
        return published


def scan_tail(
    consumer: KafkaConsumer, topic: str, partitions: int, *, timeout: float
) -> dict[int, int]:
    """The highest ``seq`` on each partition of ``topic`` (0 for an empty one).

    Reads from one before the reported end offset up to the fetch high-water mark. On
    Apache Kafka that is the last record; Tansu reports the end offset as the last
    *batch's* base offset + 1, so there this reads the whole last batch. ``consumer``
    is group-less and gets assigned the partitions. Raises KafkaTimeoutError if the
    tail cannot be read within ``timeout``, RelayError for a record without a valid
    ``seq`` header.
    """
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    ends = consumer.end_offsets(tps, timeout_ms=int(timeout * 1000))
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
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(
                f"could not read the tail of {len(pending)} partition(s) of "
                f"{topic} within {timeout:.0f} s"
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
    return published


def topic_highest_seq(bootstrap: str, topic: str, *, timeout: float = 10.0) -> int:
    """The highest ``seq`` published on ``topic`` (0 when the topic is empty or absent).

    Reads only each partition's tail; creates nothing. Raises KafkaError (for example
    NoBrokersAvailable) when the broker cannot be reached or the tail not read within
    ``timeout``, RelayError for a record without a valid ``seq`` header.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="keyledger-relay-status",
        group_id=None,
        enable_auto_commit=False,
        allow_auto_create_topics=False,
        fetch_max_wait_ms=100,
        request_timeout_ms=int(timeout * 1000) + 1000,
        bootstrap_timeout_ms=int(timeout * 1000),
    )
    try:
        ids = consumer.partitions_for_topic(topic)
        if not ids:
            return 0
        return max(scan_tail(consumer, topic, max(ids) + 1, timeout=timeout).values())
    finally:
        consumer.close()


@dataclass(frozen=True)
class RelayStatus:
    """Where one relay stands. ``topic_seq`` is None when the broker was not asked or
    not reachable (``broker_error`` then names the error type)."""

    topic: str
    view: str
    position_name: str
    head_seq: int
    position: int
    lag_events: int
    lag_seconds: float
    topic_seq: int | None
    broker_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "view": self.view,
            "positionName": self.position_name,
            "headSeq": self.head_seq,
            "position": self.position,
            "lagEvents": self.lag_events,
            "lagSeconds": self.lag_seconds,
            "topicSeq": self.topic_seq,
            "broker": "unreachable"
            if self.broker_error
            else ("reachable" if self.topic_seq is not None else "not asked"),
        }


def relay_status(
    *,
    reader: LedgerReader,
    positions: PositionStore,
    now: datetime,
    view: str = CLOUDTRAIL_VIEW,
    topic: str | None = None,
    position_name: str | None = None,
    bootstrap: str | None = None,
    timeout: float = 5.0,
) -> RelayStatus:
    """Ledger head, relay position and lag of the relay for ``view``/``topic``.

    ``lag_seconds`` is the age at ``now`` (timezone-aware) of the oldest unpublished
    record's timestamp, or 0 when nothing is behind. With ``bootstrap``, the highest
    ``seq`` on the topic is read too; broker errors are reported in the result, not
    raised. Raises ValueError for an unknown view, and whatever the reader or position
    store raise.
    """
    if view not in VIEW_TOPICS:
        raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEW_TOPICS)}")
    topic = topic or VIEW_TOPICS[view]
    name = position_name or f"relay:{topic}"
    head = reader.head_seq()
    position = min(positions.get_position(name), head)
    lag_seconds = 0.0
    if position < head:
        oldest = reader.read_records(position, 1)
        if oldest:
            stamp = datetime.fromisoformat(oldest[0].event()["timestamp"])
            lag_seconds = max(0.0, (now - stamp).total_seconds())
    topic_seq: int | None = None
    broker_error: str | None = None
    if bootstrap:
        try:
            topic_seq = topic_highest_seq(bootstrap, topic, timeout=timeout)
        except (KafkaError, OSError) as exc:
            broker_error = type(exc).__name__
    return RelayStatus(
        topic=topic,
        view=view,
        position_name=name,
        head_seq=head,
        position=position,
        lag_events=head - position,
        lag_seconds=round(lag_seconds, 3),
        topic_seq=topic_seq,
        broker_error=broker_error,
    )


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
