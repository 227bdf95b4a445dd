"""The archive writer: a Kafka consumer group that files the audit topic into a
CloudTrail-layout archive with hourly, signed, chained digests.

The layout and formats (log files, their seq indexes, digests, ``.sig`` sidecars) are
defined, and validated, by ``ledger.archive_verify``.

Processing guarantee: every ``seq`` of the topic lands in exactly one log file, across
writer crashes at any point, provided one writer runs per archive directory.

* Records are archived in global ``seq`` order: the writer buffers what the
  partitions deliver and takes only the contiguous run after the highest archived
  ``seq``. So hours split the seq line into intervals, and a restart needs only one
  number: the highest archived ``seq``.
* A write produces one log file per (account, region), each first its index then its
  ``.json.gz``, each written to a temporary name, fsynced and renamed; the files of a
  write are named after its seq range ``<first>-<last>``. Offsets are committed only
  after that, per partition up to the last offset whose ``seq`` is archived.
* On start the writer reads the archive: it removes temporary files and the files of
  a write that did not finish (their seqs are not all there), resumes after the
  highest archived ``seq``, drops re-delivered records at or below it, and seals any
  hour a crash left unsealed.
* An hour is sealed (one digest per account and region, also when empty, as AWS) when
  a record of a later hour comes next in ``seq`` order, or when the writer's clock is
  ``close_after`` past the hour's end. Every log file of the hour is written before its
  digest, and every digest of an hour before any log file of a later hour. A record
  whose hour is already sealed (a late arrival) goes into the current hour's file.
* A digest is signed through ``signer.ledger_sign`` (the HSM's Ed25519 ledger key;
  the private key never leaves it). Its signature goes to ``<digest>.sig``, written
  before the digest itself.

Record values are never logged. The log files hold the CloudTrail records exactly as
published, which carry no key material, plaintext or ciphertext.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from consumers.relay import AUDIT_TOPIC, header_seq
from ledger.archive_verify import (
    DEFAULT_BUCKET,
    HASH_ALGORITHM,
    HOUR,
    SIGNATURE_ALGORITHM,
    LogName,
    digest_object,
    format_time,
    hour_of,
    index_object,
    key_fingerprint,
    log_object,
    parse_log_object,
    parse_time,
    read_index,
    scan_archive,
    signature_object,
    signing_string,
)
from ledger.clock import Clock, SystemClock

log = logging.getLogger(__name__)

DEFAULT_GROUP = "keyledger-archive"
DEFAULT_TRAIL = "keyledger"
TMP_SUFFIX = ".tmp"


class ArchiveError(RuntimeError):
    """The writer cannot keep its exactly-once guarantee and stopped.

    Raised for a record out of ``seq`` order, records of another ledger, a malformed
    envelope, or an archive whose earlier digests are missing.
    """


class LedgerSigner(Protocol):
    """The part of the keystore the writer uses (``KeyStore.ledger_sign``)."""

    def ledger_sign(self, label: str, message: bytes) -> bytes: ...


@dataclass(frozen=True)
class ArchivedRecord:
    """One record to archive: the envelope's ``seq``, ``recordHash``, ``ledger`` and
    the bare CloudTrail ``record``."""

    seq: int
    record_hash: str
    ledger: str
    record: dict[str, Any] = field(repr=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


class ArchiveStore:
    """The file side of the writer: log files, indexes, digests. No Kafka here.

    Feed records in ``seq`` order with :meth:`add`; :meth:`flush` writes what is
    pending; :meth:`seal_due` seals hours by the clock. Not thread-safe.
    """

    def __init__(
        self,
        root: Path,
        *,
        signer: LedgerSigner,
        signing_label: str,
        public_key: bytes,
        bucket: str = DEFAULT_BUCKET,
        trail: str = DEFAULT_TRAIL,
        default_account: str = "111122223333",
        default_region: str = "us-east-1",
        max_records_per_file: int = 5000,
        start_seq: int = 1,
        after_file: Callable[[Path], None] | None = None,
    ) -> None:
        """Configure the store and recover its state from ``root`` (see the module).

        ``signer.ledger_sign(signing_label, message)`` signs digests with the Ed25519
        key whose raw public key is ``public_key``. ``default_account`` and
        ``default_region`` place records without ``recipientAccountId`` or
        ``awsRegion``. ``start_seq`` is the first seq of a new archive.
        ``after_file`` (for tests) is called with each log file once it is durable,
        before its write completes.

        Raises ValueError for a bad argument, OSError if ``root`` cannot be read,
        ArchiveError if the archive in ``root`` is inconsistent.
        """
        if max_records_per_file < 1 or start_seq < 1:
            raise ValueError("max_records_per_file and start_seq must be positive")
        if "_" in trail or "/" in trail or not trail:
            raise ValueError("the trail name must be non-empty, without '_' or '/'")
        self.root = root
        self._signer = signer
        self._label = signing_label
        self._fingerprint = key_fingerprint(public_key)
        self._bucket = bucket
        self._trail = trail
        self._default_account = default_account
        self._default_region = default_region
        self._max_records = max_records_per_file
        self._after_file = after_file
        self._pending: list[ArchivedRecord] = []
        self._chains: dict[tuple[str, str], datetime] = {}  # first hour of each chain
        self._sealed: dict[tuple[str, str], datetime] = {}  # next hour to seal per chain
        self._open_hour: datetime | None = None
        self._ledger: str | None = None
        self.archived_seq = start_seq - 1
        self.files_written = 0
        self.digests_written = 0
        root.mkdir(parents=True, exist_ok=True)
        self._recover()

    # -- state

    @property
    def next_seq(self) -> int:
        """The seq :meth:`add` expects next."""
        return self.archived_seq + len(self._pending) + 1

    @property
    def pending(self) -> int:
        """Records accepted but not yet written."""
        return len(self._pending)

    def _recover(self) -> None:
        for tmp in self.root.rglob("*" + TMP_SUFFIX):
            tmp.unlink()
        logs, digests = scan_archive(self.root)
        logs = self._drop_unfinished_write(logs)
        if logs:
            self.archived_seq = max(n.last for n in logs)
            self._ledger = read_index(self.root / index_object(logs[-1].key))[0]
        for n in logs:
            self._chains[n.chain] = min(self._chains.get(n.chain, n.hour), n.hour)
        for d in digests:
            if d.trail == self._trail:
                first = d.end - HOUR
                self._chains[d.chain] = min(self._chains.get(d.chain, first), first)
                self._sealed[d.chain] = max(self._sealed.get(d.chain, d.end), d.end)
        hours = [n.hour for n in logs] + [d.end for d in digests if d.trail == self._trail]
        if hours:
            self._open_hour = max(hours)
            self._seal_before(self._open_hour)
        log.info(
            "archive %s: resuming after seq %d, open hour %s",
            self.root,
            self.archived_seq,
            self._open_hour and format_time(self._open_hour),
        )

    def _drop_unfinished_write(self, logs: list[LogName]) -> list[LogName]:
        """Remove the files of the last write if a crash cut it short, and indexes
        whose log file was never written. Only the last write can be unfinished."""
        listed = {index_object(n.key) for n in logs}
        for index in (self.root / "AWSLogs").rglob("*.index.json"):
            if index.relative_to(self.root).as_posix() not in listed:
                index.unlink()
        if not logs:
            return logs
        last = max(logs, key=lambda n: (n.last, n.first))
        group = [n for n in logs if (n.first, n.last) == (last.first, last.last)]
        seqs: list[int] = []
        try:
            for n in group:
                seqs.extend(seq for seq, _ in read_index(self.root / index_object(n.key))[1])
        except (OSError, ValueError) as err:
            raise ArchiveError(f"index of {last.key} cannot be read: {err}") from None
        if sorted(seqs) == list(range(last.first, last.last + 1)):
            return logs
        log.warning(
            "archive %s: removing unfinished write of seq %d-%d", self.root, last.first, last.last
        )
        for n in group:
            (self.root / n.key).unlink()
            (self.root / index_object(n.key)).unlink(missing_ok=True)
        return [n for n in logs if n not in group]

    # -- records

    def add(self, record: ArchivedRecord) -> None:
        """Accept the next record (its ``seq`` must be :attr:`next_seq`). May write
        files: the pending ones when the record starts a later hour (then seal the
        hours in between) or when a file is full.

        Raises ArchiveError for a record out of order or of another ledger, ValueError
        for a record without a valid ``eventTime``, OSError or the signer's errors.
        """
        if record.seq != self.next_seq:
            raise ArchiveError(f"expected seq {self.next_seq}, got {record.seq}")
        if self._ledger is None:
            self._ledger = record.ledger
        elif record.ledger != self._ledger:
            raise ArchiveError("record of another ledger than the archive's")
        hour = hour_of(parse_time(str(record.record["eventTime"])))
        if self._open_hour is None:
            self._open_hour = hour
        elif hour > self._open_hour:
            self.flush()
            self._seal_before(hour)
            self._open_hour = hour
        self._pending.append(record)
        if len(self._pending) >= self._max_records:
            self.flush()

    def flush(self) -> list[Path]:
        """Write the pending records: one log file per (account, region) and its index.
        Returns the log files written. Raises OSError or whatever ``after_file``
        raises; after a failure, start a new store to recover."""
        if not self._pending:
            return []
        assert self._open_hour is not None and self._ledger is not None
        first, last = self._pending[0].seq, self._pending[-1].seq
        groups: dict[tuple[str, str], list[ArchivedRecord]] = {}
        for r in self._pending:
            groups.setdefault(self._chain_of(r.record), []).append(r)
        written = []
        for (account, region), records in groups.items():
            oldest = min(parse_time(str(r.record["eventTime"])) for r in records)
            stamp = max(oldest, self._open_hour).replace(second=0, microsecond=0)
            key = log_object(account, region, stamp, first, last)
            index = {"ledger": self._ledger, "records": [[r.seq, r.record_hash] for r in records]}
            body = _dumps({"Records": [r.record for r in records]})
            _write_durably(self.root / index_object(key), _dumps(index))
            _write_durably(self.root / key, gzip.compress(body, mtime=0))
            self._chains.setdefault((account, region), self._open_hour)
            self.files_written += 1
            written.append(self.root / key)
            if self._after_file is not None:
                self._after_file(self.root / key)
        self.archived_seq = last
        self._pending = []
        return written

    def _chain_of(self, record: dict[str, Any]) -> tuple[str, str]:
        account = record.get("recipientAccountId") or self._default_account
        region = record.get("awsRegion") or self._default_region
        return str(account), str(region)

    # -- digests

    def seal_due(self, now: datetime, close_after: timedelta) -> int:
        """Seal every hour that ended at least ``close_after`` before ``now`` (pending
        records are written first). Returns the number of hours sealed. Raises OSError
        or the signer's errors."""
        sealed = 0
        while self._open_hour is not None and self._open_hour + HOUR + close_after <= now:
            self.flush()
            self._seal_before(self._open_hour + HOUR)
            self._open_hour += HOUR
            sealed += 1
        return sealed

    def _seal_before(self, until: datetime) -> None:
        """Seal every chain's hours from its newest digest up to ``until``. Hours
        before a chain's newest digest are never rewritten."""
        for chain, first in sorted(self._chains.items()):
            hour = self._sealed.get(chain, first)
            while hour < until:
                self._seal(chain[0], chain[1], hour, first)
                hour += HOUR
                self._sealed[chain] = hour

    def _seal(self, account: str, region: str, hour: datetime, first: datetime) -> None:
        key = digest_object(account, region, self._trail, hour + HOUR)
        path = self.root / key
        if path.exists():
            return
        previous: dict[str, Any] = {
            "previousDigestS3Bucket": None,
            "previousDigestS3Object": None,
            "previousDigestHashValue": None,
            "previousDigestHashAlgorithm": None,
            "previousDigestSignature": None,
        }
        if hour > first:
            prev_key = digest_object(account, region, self._trail, hour)
            try:
                prev_inflated = gzip.decompress((self.root / prev_key).read_bytes())
                prev_sig = orjson.loads((self.root / signature_object(prev_key)).read_bytes())
            except (OSError, ValueError) as err:
                raise ArchiveError(f"previous digest {prev_key} cannot be read: {err}") from None
            previous = {
                "previousDigestS3Bucket": self._bucket,
                "previousDigestS3Object": prev_key,
                "previousDigestHashValue": hashlib.sha256(prev_inflated).hexdigest(),
                "previousDigestHashAlgorithm": HASH_ALGORITHM,
                "previousDigestSignature": prev_sig["signature"],
            }
        files = list(self._log_entries(account, region, hour))
        times = [t for f in files for t in (f["oldestEventTime"], f["newestEventTime"])]
        digest = {
            "awsAccountId": account,
            "digestStartTime": format_time(hour),
            "digestEndTime": format_time(hour + HOUR),
            "digestS3Bucket": self._bucket,
            "digestS3Object": key,
            "digestPublicKeyFingerprint": self._fingerprint,
            "digestSignatureAlgorithm": SIGNATURE_ALGORITHM,
            "newestEventTime": max(times) if times else None,
            "oldestEventTime": min(times) if times else None,
            **previous,
            "logFiles": files,
        }
        inflated = _dumps(digest)
        signature = self._signer.ledger_sign(self._label, signing_string(digest, inflated))
        meta = {"signature": signature.hex(), "signature-algorithm": SIGNATURE_ALGORITHM}
        _write_durably(self.root / signature_object(key), _dumps(meta))
        _write_durably(path, gzip.compress(inflated, mtime=0))
        self.digests_written += 1
        log.info("archive %s: sealed %s", self.root, key)

    def _log_entries(self, account: str, region: str, hour: datetime) -> Iterator[dict[str, Any]]:
        folder = self.root / "AWSLogs" / account / "CloudTrail" / region / f"{hour:%Y/%m/%d}"
        if not folder.is_dir():
            return
        names: list[LogName] = []
        for path in folder.glob("*.json.gz"):
            name = parse_log_object(path.relative_to(self.root).as_posix())
            if name is not None and name.hour == hour:
                names.append(name)
        for name in sorted(names, key=lambda n: (n.first, n.key)):
            inflated = gzip.decompress((self.root / name.key).read_bytes())
            records = orjson.loads(inflated)["Records"]
            times = sorted(str(r["eventTime"]) for r in records)
            yield {
                "s3Bucket": self._bucket,
                "s3Object": name.key,
                "hashValue": hashlib.sha256(inflated).hexdigest(),
                "hashAlgorithm": HASH_ALGORITHM,
                "newestEventTime": times[-1],
                "oldestEventTime": times[0],
            }


# ---------------------------------------------------------------- the consumer


def parse_envelope(value: bytes, headers: Iterable[tuple[str, bytes]] | None) -> ArchivedRecord:
    """The archived form of one published value. Raises ArchiveError if the value is
    not an envelope or its ``seq`` disagrees with the ``seq`` header (RelayError if the
    header is missing)."""
    seq = header_seq(list(headers or ()))
    try:
        envelope = orjson.loads(value)
        record = envelope["record"]
        ok = (
            envelope["seq"] == seq
            and isinstance(record, dict)
            and isinstance(envelope["recordHash"], str)
            and isinstance(envelope["ledger"], str)
        )
    except (orjson.JSONDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ArchiveError(f"the record at seq {seq} is not a valid envelope")
    return ArchivedRecord(seq, envelope["recordHash"], envelope["ledger"], record)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, writer: ArchiveWriter) -> None:
        self._writer = writer

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._writer._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        pass


class ArchiveWriter:
    """Consumes the audit topic into an :class:`ArchiveStore`, exactly once per seq.

    Connects lazily (first :meth:`run_once`). Not thread-safe: drive it from one thread.
    """

    def __init__(
        self,
        *,
        store: ArchiveStore,
        bootstrap: str,
        topic: str = AUDIT_TOPIC,
        group: str = DEFAULT_GROUP,
        clock: Clock | None = None,
        close_after: timedelta = timedelta(minutes=5),
        flush_interval: float = 60.0,
        max_buffer: int = 50_000,
        timeout: float = 60.0,
        consumer_factory: Callable[[], KafkaConsumer] | None = None,
    ) -> None:
        """``close_after``: how long after an hour's end it is sealed when no record
        of a later hour arrives. ``flush_interval``: seconds a record may wait before
        its file is written. ``max_buffer``: out-of-order records held before the
        partitions that are ahead are paused. ``timeout``: how long :meth:`run_once`
        waits for a partition assignment and the end of the topic.

        Raises ValueError for a non-positive ``max_buffer``.
        """
        if max_buffer < 1:
            raise ValueError("max_buffer must be positive")
        self.store = store
        self._bootstrap = bootstrap
        self._topic = topic
        self._group = group
        self._clock = clock or SystemClock()
        self._close_after = close_after
        self._flush_interval = flush_interval
        self._max_buffer = max_buffer
        self._timeout = timeout
        self._consumer_factory = consumer_factory or self._default_consumer
        self._consumer: KafkaConsumer | None = None
        self._buffer: dict[int, tuple[TopicPartition, ArchivedRecord]] = {}
        self._uncommitted: dict[TopicPartition, list[tuple[int, int]]] = {}
        self._pending_since: float | None = None

    def _default_consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=self._group,
            client_id=f"keyledger-archive-{self._group}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=2000,
            max_poll_records=1000,
            fetch_max_wait_ms=100,
        )

    def _ensure_consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            consumer = self._consumer_factory()
            consumer.subscribe([self._topic], listener=_Rebalance(self))
            self._consumer = consumer
        return self._consumer

    # -- running

    def run_once(self) -> int:
        """Archive everything on the topic now, write it, seal the hours that are due,
        commit, and return the number of records archived.

        Raises KafkaTimeoutError if no partition is assigned or the end of the topic
        is not reached within ``timeout``, ArchiveError if a seq never arrives (a gap
        in the topic, or ``start_seq`` below the topic's first seq), KafkaError,
        OSError, or the signer's errors.
        """
        consumer = self._ensure_consumer()
        before = self.store.archived_seq
        deadline = time.monotonic() + self._timeout
        while True:
            self._poll(consumer, 200)
            assigned = consumer.assignment()
            if assigned and self._caught_up(consumer, assigned):
                break
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"did not reach the end of {self._topic} in time")
        self.store.flush()
        self.store.seal_due(self._clock.now(), self._close_after)
        self._commit(consumer)
        if self._buffer:
            raise ArchiveError(
                f"waiting for seq {self.store.next_seq}, the topic holds seq "
                f"{min(self._buffer)} and later ({len(self._buffer)} records held back)"
            )
        return self.store.archived_seq - before

    def run_forever(self, stop: threading.Event, poll_interval: float = 0.5) -> None:
        """Archive until ``stop`` is set; writes pending records every
        ``flush_interval`` seconds and seals hours as they close. Raises what
        :meth:`run_once` raises (except the timeouts)."""
        consumer = self._ensure_consumer()
        while not stop.is_set():
            self._poll(consumer, int(poll_interval * 1000))
            if (
                self._pending_since is not None
                and time.monotonic() - self._pending_since >= self._flush_interval
            ):
                self.store.flush()
            self.store.seal_due(self._clock.now(), self._close_after)
            self._commit(consumer)
        self.store.flush()
        self._commit(consumer)

    def close(self) -> None:
        """Close the consumer without committing anything more. Safe to call twice."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close(autocommit=False)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals

    def _poll(self, consumer: KafkaConsumer, timeout_ms: int) -> None:
        batches = consumer.poll(timeout_ms=timeout_ms)
        for tp, messages in batches.items():
            for message in messages:
                record = parse_envelope(message.value, message.headers)
                self._uncommitted.setdefault(tp, []).append((message.offset, record.seq))
                if record.seq >= self.store.next_seq:
                    self._buffer.setdefault(record.seq, (tp, record))
        archived = self.store.archived_seq
        while self.store.next_seq in self._buffer:
            _, record = self._buffer.pop(self.store.next_seq)
            self.store.add(record)
        if self.store.pending and self._pending_since is None:
            self._pending_since = time.monotonic()
        if self.store.archived_seq != archived:
            self._commit(consumer)
        self._backpressure(consumer)

    def _backpressure(self, consumer: KafkaConsumer) -> None:
        # A partition that delivered a buffered record does not hold next_seq (seqs
        # rise within a partition), so pausing it never stalls progress.
        paused = consumer.paused()
        if len(self._buffer) > self._max_buffer:
            ahead = {tp for tp, _ in self._buffer.values()} - paused
            if ahead:
                consumer.pause(*ahead)
        elif paused and len(self._buffer) <= self._max_buffer // 2:
            consumer.resume(*paused)

    def _caught_up(self, consumer: KafkaConsumer, assigned: set[TopicPartition]) -> bool:
        for tp in assigned:
            highwater = consumer.highwater(tp)
            if highwater is None or consumer.position(tp) < highwater:
                return False
        return True

    def _commit(self, consumer: KafkaConsumer) -> None:
        """Commit, per partition, past the last message whose seq is archived."""
        if not self.store.pending:
            self._pending_since = None
        archived = self.store.archived_seq
        offsets = {}
        for tp, rows in self._uncommitted.items():
            done = 0
            while done < len(rows) and rows[done][1] <= archived:
                done += 1
            if done:
                offsets[tp] = OffsetAndMetadata(rows[done - 1][0] + 1, "", -1)
                del rows[:done]
        if offsets:
            consumer.commit(offsets)

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is not None:
            self._commit(consumer)
        for seq, (tp, _) in list(self._buffer.items()):
            if tp in revoked:
                del self._buffer[seq]
        for tp in revoked:
            self._uncommitted.pop(tp, None)
