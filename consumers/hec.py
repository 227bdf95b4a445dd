"""The Splunk HEC view of an audit record, and the forwarder that POSTs it to Splunk.

:func:`hec_event` turns one published envelope ``{ledger, seq, recordHash, prev, record}``
into a Splunk HTTP Event Collector event (``/services/collector/event`` JSON protocol,
sourcetype ``aws:cloudtrail``) carrying ``seq``, ``recordHash`` and ``ledger`` as indexed
fields, so a SIEM copy maps back to a proof.

:class:`HecForwarder` is a Kafka consumer group on the audit topic that batches records,
POSTs each batch to the collector and commits offsets only afterwards.

Guarantee: **at least once**. Offsets are committed (manually, never auto-commit) only
after the collector accepted the batch, and only up to the contiguous delivered
position of each partition. A forwarder killed between a successful POST and its commit
(or whose commit fails because the group rebalanced) sends that batch again after the
restart; every event keeps its ``fields.seq`` and ``event.eventID``, so the SIEM can
deduplicate on either. A batch is never dropped: failed POSTs are retried with capped
exponential backoff until they succeed or the forwarder is asked to stop.

Neither the token nor any record content is ever logged or put in an exception message.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from consumers.relay import AUDIT_TOPIC
from ledger.errors import ValidationError

log = logging.getLogger(__name__)

SOURCETYPE = "aws:cloudtrail"
DEFAULT_HOST = "keyledger"
DEFAULT_GROUP = "keyledger-hec"
TOKEN_ENV = "KEYLEDGER_HEC_TOKEN"  # noqa: S105 - the variable's name, not a token
EVENT_PATH = "/services/collector/event"
_MAX_RESPONSE = 64 * 1024


# ---------------------------------------------------------------- the view


def hec_event(envelope: dict[str, Any], *, host: str = DEFAULT_HOST) -> dict[str, Any]:
    """The Splunk HEC event for one published envelope (a pure function).

    Returns ``{"time", "host", "source", "sourcetype", "event", "fields"}``: ``time`` is
    the record's ``eventTime`` in epoch seconds (an int: CloudTrail times are whole
    seconds), ``source`` is ``keyledger:<ledger id>``, ``event`` is the CloudTrail record
    itself (the same object, not a copy), and ``fields`` holds the flat indexed fields
    ``seq`` (int), ``recordHash`` and ``ledger`` (str). Nothing else in the envelope is
    carried over.

    Raises KeyError if the envelope lacks ``ledger``, ``seq``, ``recordHash``, ``record``
    or ``record.eventTime``; ValueError if ``eventTime`` is not ISO 8601 with an offset;
    TypeError if ``seq`` is not an int or ``ledger``/``recordHash`` are not strings.
    """
    ledger_id = envelope["ledger"]
    seq = envelope["seq"]
    record_hash = envelope["recordHash"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise TypeError("envelope seq must be an int")
    if not isinstance(ledger_id, str) or not isinstance(record_hash, str):
        raise TypeError("envelope ledger and recordHash must be strings")
    record: dict[str, Any] = envelope["record"]
    return {
        "time": _epoch_seconds(record["eventTime"]),
        "host": host,
        "source": f"keyledger:{ledger_id}",
        "sourcetype": SOURCETYPE,
        "event": record,
        "fields": {"seq": seq, "recordHash": record_hash, "ledger": ledger_id},
    }


def as_hec_event(value: dict[str, Any], *, host: str = DEFAULT_HOST) -> dict[str, Any]:
    """``value`` as a HEC event: an audit envelope through :func:`hec_event`, or a value
    that already is the HEC view (from the relay's HEC topic) unchanged.

    Raises what :func:`hec_event` raises for anything that is neither.
    """
    if "record" not in value and {"event", "fields", "sourcetype"} <= value.keys():
        return value
    return hec_event(value, host=host)


def _epoch_seconds(event_time: str) -> int:
    parsed = datetime.fromisoformat(event_time)
    if parsed.tzinfo is None:
        raise ValueError("eventTime has no UTC offset")
    return int(parsed.timestamp())


# ---------------------------------------------------------------- the HTTP client


class HecDeliveryError(Exception):
    """A POST to the collector did not succeed; the batch must be sent again.

    ``status`` is the HTTP status (None when no answer came: connection refused, reset,
    timeout) and ``code`` the HEC answer's ``code`` when there was one. The message
    names only these and the exception type, never the token or the body.
    """

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class HecClient:
    """POSTs batches of HEC events to one collector URL with ``Authorization: Splunk``.

    Redirects are never followed (a redirect would carry the token elsewhere); a 3xx is
    a failed delivery like any other non-2xx answer. Security caveat: with an
    ``http://`` URL the token and the records cross the network in clear text; use
    ``https://`` except on loopback. Not thread-safe.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Check the URL and token; opens no connection.

        A URL without a path gets ``/services/collector/event``. Raises ValidationError
        for a scheme other than http/https, a URL without a host or with user info, or
        a token that is empty or holds whitespace or control characters (the message
        never contains the token).
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValidationError("The HEC URL must start with http:// or https://.")
        if not parts.hostname:
            raise ValidationError("The HEC URL has no host.")
        if parts.username is not None or parts.password is not None:
            raise ValidationError(f"Put no credentials in the HEC URL; use {TOKEN_ENV}.")
        if not token or any(not ("!" <= ch <= "~") for ch in token):
            raise ValidationError(
                f"{TOKEN_ENV} must be a non-empty token of printable ASCII without spaces."
            )
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        path = parts.path if parts.path not in ("", "/") else EVENT_PATH
        self._target = path + (f"?{parts.query}" if parts.query else "")
        self._authorization = f"Splunk {token}"
        self._timeout = timeout
        self._ssl_context = ssl_context
        if not self._https and self._host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("hec: the token is sent in clear text to %s (http://)", self._host)

    def __repr__(self) -> str:
        scheme = "https" if self._https else "http"
        return f"HecClient({scheme}://{self._host}:{self._port or ''}{self._target})"

    def post(self, body: bytes) -> None:
        """POST ``body`` (concatenated HEC events); return when the collector accepted it.

        Success is a 2xx answer whose JSON body has ``"code": 0``. Raises
        HecDeliveryError for anything else: another status, another code, a body that is
        not such JSON, or no answer at all (OSError, http.client.HTTPException).
        """
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host,
                self._port,
                timeout=self._timeout,
                context=self._ssl_context or ssl.create_default_context(),
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            conn.request(
                "POST",
                self._target,
                body=body,
                headers={
                    "Authorization": self._authorization,
                    "Content-Type": "application/json",
                },
            )
            response = conn.getresponse()
            status = response.status
            raw = response.read(_MAX_RESPONSE)
        except (OSError, http.client.HTTPException) as exc:
            raise HecDeliveryError(f"HEC unreachable: {type(exc).__name__}") from None
        finally:
            conn.close()
        code = _answer_code(raw)
        if 200 <= status < 300 and code == 0:
            return
        raise HecDeliveryError(f"HEC answered {status} (code {code})", status=status, code=code)


def _answer_code(raw: bytes) -> int | None:
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    code = answer.get("code") if isinstance(answer, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


# ---------------------------------------------------------------- the forwarder


class HecForwarderError(RuntimeError):
    """The forwarder met a record it cannot forward and stopped without committing it.

    Raised for a record whose value is not an audit envelope; the message names the
    topic, partition and offset, never the value. Nothing at or after that record is
    committed, so fixing the cause and restarting loses nothing.
    """


@dataclass
class ForwarderStats:
    """Counters of one :meth:`HecForwarder.run` (for the CLI and tests)."""

    records: int = 0
    batches: int = 0
    failed_posts: int = 0
    failed_commits: int = 0


@dataclass
class _Item:
    tp: TopicPartition
    offset: int
    data: bytes = field(repr=False)


class _Stopped(Exception):
    """Stop was requested while a batch was still undelivered."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, forwarder: HecForwarder) -> None:
        self._forwarder = forwarder

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self._forwarder._drop(set(revoked))

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self._forwarder._joined = True
        log.info("hec: assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))


class HecForwarder:
    """Consumer group on the audit topic that forwards every record to Splunk HEC.

    A batch is POSTed when it holds ``batch_size`` records or ``batch_bytes`` bytes of
    events, or ``max_wait`` seconds after its first record arrived. Memory is bounded:
    at most ``batch_size`` records are buffered (plus, only after a rebalance during a
    retry, one more poll of at most ``batch_size``), and the consumer fetches at most
    ``fetch_max_bytes`` at a time. See the module docstring for the guarantee.

    A new group starts at the earliest offset of each partition. Connections open in
    :meth:`run`, never in the constructor. Not thread-safe: drive one instance from
    one thread (another thread may set the ``stop`` event).
    """

    def __init__(
        self,
        *,
        client: HecClient,
        bootstrap: str,
        topic: str = AUDIT_TOPIC,
        group_id: str = DEFAULT_GROUP,
        batch_size: int = 500,
        batch_bytes: int = 1_000_000,
        max_wait: float = 1.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
        session_timeout_ms: int = 6000,
        fetch_max_bytes: int = 8 * 1024 * 1024,
        host: str = DEFAULT_HOST,
        after_post: Callable[[int], None] | None = None,
    ) -> None:
        """Configure the forwarder; opens no connection.

        ``after_post`` (for tests) is called with the number of delivered batches after
        each successful POST and before its offsets are committed.

        Raises ValueError for a non-positive size, byte limit, wait or backoff.
        """
        if batch_size < 1 or batch_bytes < 1 or fetch_max_bytes < 1:
            raise ValueError("batch_size, batch_bytes and fetch_max_bytes must be positive")
        if max_wait <= 0 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("max_wait and backoff must be positive, backoff_max >= initial")
        self._client = client
        self._bootstrap = bootstrap
        self._topic = topic
        self._group_id = group_id
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        self._max_wait = max_wait
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._session_timeout_ms = session_timeout_ms
        self._fetch_max_bytes = fetch_max_bytes
        self._host = host
        self._after_post = after_post
        self._buffer: list[_Item] = []
        self._buffer_bytes = 0
        self._first_at = 0.0
        self._joined = False
        self.stats = ForwarderStats()

    @property
    def topic(self) -> str:
        return self._topic

    def run(self, *, stop: threading.Event | None = None, once: bool = False) -> ForwarderStats:
        """Forward records until ``stop`` is set or, with ``once``, until caught up.

        Caught up means: every assigned partition was read up to the high-water mark
        its last fetch reported, and everything read was delivered and committed (a
        member that was assigned no partitions, e.g. for a missing topic, is caught up
        at once). On stop, an undelivered batch is abandoned without committing (it is
        read again on the next start); the consumer leaves the group and is closed.

        Raises HecForwarderError (see the class) and KafkaError for a broker that cannot
        be reached at start. A failed commit is logged and counted, not raised.
        """
        stop = stop or threading.Event()
        self.stats = ForwarderStats()
        self._buffer, self._buffer_bytes, self._joined = [], 0, False
        consumer = self._new_consumer()
        try:
            consumer.subscribe([self._topic], listener=_Listener(self))
            while not stop.is_set():
                room = self._batch_size - len(self._buffer)
                if room > 0 and self._buffer_bytes < self._batch_bytes:
                    self._add(consumer.poll(timeout_ms=self._poll_ms(), max_records=room))
                caught_up = once and self._caught_up(consumer)
                if self._buffer and (caught_up or self._batch_due()):
                    self._deliver(consumer, stop)
                    continue
                if caught_up:
                    break
        except _Stopped:
            log.info("hec: stopped with an undelivered batch; it is sent again on restart")
        finally:
            consumer.close()
            self._buffer, self._buffer_bytes = [], 0
        return self.stats

    # -- buffering -------------------------------------------------------------------

    def _poll_ms(self) -> int:
        if not self._buffer:
            return 500
        left = self._first_at + self._max_wait - time.monotonic()
        return max(0, int(left * 1000))

    def _batch_due(self) -> bool:
        return (
            len(self._buffer) >= self._batch_size
            or self._buffer_bytes >= self._batch_bytes
            or time.monotonic() - self._first_at >= self._max_wait
        )

    def _add(self, polled: dict[TopicPartition, list[Any]]) -> None:
        for tp, messages in polled.items():
            for message in messages:
                try:
                    envelope = orjson.loads(message.value)
                    data = orjson.dumps(as_hec_event(envelope, host=self._host))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                    raise HecForwarderError(
                        f"record {tp.topic}/{tp.partition}@{message.offset} is not an "
                        "audit envelope; nothing from it on was committed"
                    ) from None
                if not self._buffer:
                    self._first_at = time.monotonic()
                self._buffer.append(_Item(tp, message.offset, data))
                self._buffer_bytes += len(data)

    def _drop(self, revoked: set[TopicPartition]) -> None:
        """Forget buffered records of revoked partitions (their new owner reads them)."""
        kept = [item for item in self._buffer if item.tp not in revoked]
        if len(kept) != len(self._buffer):
            log.info(
                "hec: dropped %d buffered records of revoked partitions",
                len(self._buffer) - len(kept),
            )
        self._buffer = kept
        self._buffer_bytes = sum(len(item.data) for item in kept)

    def _take(self) -> list[_Item]:
        """The front of the buffer within the count and byte limits (at least one)."""
        batch: list[_Item] = []
        size = 0
        for item in self._buffer:
            if batch and (
                len(batch) >= self._batch_size or size + len(item.data) > self._batch_bytes
            ):
                break
            batch.append(item)
            size += len(item.data)
        return batch

    # -- delivery --------------------------------------------------------------------

    def _deliver(self, consumer: KafkaConsumer, stop: threading.Event) -> None:
        """POST the front of the buffer until it succeeds, then commit its offsets.

        Raises _Stopped if ``stop`` is set while the batch is still undelivered.
        """
        backoff = self._backoff_initial
        while True:
            batch = self._take()
            if not batch:  # everything was revoked meanwhile
                return
            try:
                self._client.post(b"".join(item.data for item in batch))
                break
            except HecDeliveryError as exc:
                self.stats.failed_posts += 1
                log.warning("hec: %s; %d records, retrying in %.1f s", exc, len(batch), backoff)
            self._wait_in_group(consumer, stop, backoff)
            if stop.is_set():
                raise _Stopped
            backoff = min(backoff * 2, self._backoff_max)
        del self._buffer[: len(batch)]
        self._buffer_bytes -= sum(len(item.data) for item in batch)
        if self._buffer:
            self._first_at = time.monotonic()
        self.stats.records += len(batch)
        self.stats.batches += 1
        if self._after_post is not None:
            self._after_post(self.stats.batches)
        self._commit(consumer, batch)

    def _wait_in_group(self, consumer: KafkaConsumer, stop: threading.Event, delay: float) -> None:
        """Wait ``delay`` seconds while still calling poll, so the group keeps us.

        Fetching is paused meanwhile; a rebalance may revoke partitions (their records
        leave the buffer) or assign new ones (their first records join the buffer).
        """
        deadline = time.monotonic() + delay
        while not stop.is_set():
            consumer.pause(*consumer.assignment())
            self._add(consumer.poll(timeout_ms=0, max_records=self._batch_size))
            left = deadline - time.monotonic()
            if left <= 0:
                break
            stop.wait(min(left, 1.0))
        consumer.resume(*consumer.assignment())

    def _commit(self, consumer: KafkaConsumer, batch: list[_Item]) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for item in batch:  # in offset order within a partition: the last one wins
            offsets[item.tp] = OffsetAndMetadata(item.offset + 1, "", -1)
        try:
            consumer.commit(offsets=offsets)
        except (CommitFailedError, KafkaError) as exc:
            # Later commits cover these offsets; a restart before then resends the batch.
            self.stats.failed_commits += 1
            log.warning(
                "hec: commit failed (%s); the batch may be delivered again", type(exc).__name__
            )

    # -- Kafka -----------------------------------------------------------------------

    def _caught_up(self, consumer: KafkaConsumer) -> bool:
        if not self._joined:
            return False
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None or consumer.position(tp) < highwater:
                return False
        return True

    def _new_consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=self._group_id,
            client_id="keyledger-hec",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=max(self._session_timeout_ms // 3, 100),
            max_poll_records=self._batch_size,
            fetch_max_bytes=self._fetch_max_bytes,
            fetch_max_wait_ms=200,
        )
