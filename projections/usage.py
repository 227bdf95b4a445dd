"""The usage index: one row per recorded call (successful or failed), with the alias
history that resolves ``--key alias/...`` as the alias was at each call's time.

Tables (each in the ledger's database, beside the log):

- ``kl_usage``: seq, time, key ARN (resolved), the source key of a ReEncrypt, KeyId as
  sent, operation, event kind, principal, account, region, source IP, user agent,
  encryption context, algorithm, error code, request id;
- ``kl_usage_pairs``: one row per encryption-context pair of a call (the number of its
  ``context_pair`` text, seq), for ``k=v`` lookups;
- ``kl_alias_hist``: which key each alias ARN named from one seq up to the next;
- ``kl_usage_names``: the number of each key ARN, principal and context pair
  (``name_number``). The indexes by key, by principal and by pair hold these numbers,
  not the text: ARNs share their first 20 to 40 characters, so every comparison in an
  index build read that far (on a million calls the three indexes built in 4.2 s
  instead of 6.8 s on PostgreSQL). Queries look names up here,
  so a number matches only the name stored with it; a batch whose names share a
  number with others (odds about 1 in 10^8 for a million names) fails with
  ``NameCollision``, never indexes wrong rows.

Rows and the tracked position are written in one transaction per batch, so a crash
leaves a consistent prefix; inserts ignore rows already there, so applying a record
twice changes nothing. Only request fields AWS logs reach the index (no plaintext,
ciphertext or token ever does: the stored events do not hold them).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import msgspec
import orjson

from ledger.persistence import (
    CopyData,
    LedgerDatabase,
    SqlCursor,
    SQLiteBatch,
    copy_rows,
    pg_text_row,
    sqlite_batch,
)
from ledger.records import LedgerRecord

USAGE = "kl_usage"
CONTEXT = "kl_usage_pairs"  # (pair_no, seq): name_number() of context_pair()
#: Tables of earlier versions: when there, the index is dropped and rebuilt from the log.
_OBSOLETE_TABLES = ("kl_usage_ctx",)
ALIAS_HISTORY = "kl_alias_hist"
NAMES = "kl_usage_names"  # (no, name): key ARNs, principals and pairs by number
POSITION_NAME = "projection:usage:v1"
WRITE_LOCK_ID = 0x6B6C7573  # "klus": one usage-index writer at a time (PostgreSQL)
#: A rebuild or catch-up of at least this many records decodes them in forked worker
#: processes.
PARALLEL_MIN_RECORDS = 50_000
#: Decode (and on PostgreSQL read) processes and records per transaction in a rebuild.
REBUILD_WORKERS = 2
REBUILD_BATCH = 20_000

#: Operations GetKeyLastUsage counts (botocore's KeyLastUsageTrackingOperation).
CRYPTO_OPERATIONS = frozenset(
    {
        "Decrypt",
        "DeriveSharedSecret",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateMac",
        "ReEncrypt",
        "Sign",
        "Verify",
        "VerifyMac",
        "Encapsulate",
        "Decapsulate",
    }
)
_KEY_SENT_FIELDS = ("keyId", "destinationKeyId", "targetKeyId")
_CONTEXT_FIELDS = ("encryptionContext", "destinationEncryptionContext")
_ALGORITHM_FIELDS = (
    "encryptionAlgorithm",
    "destinationEncryptionAlgorithm",
    "signingAlgorithm",
    "macAlgorithm",
    "keyAgreementAlgorithm",
    "keyPairSpec",
    "keySpec",
)
_TOPIC_PREFIX = "ledger.domain.model:"
# KeyId as sent, for calls that resolved to no key (the partial index kl_usage_sent)
_SENT_CLAUSE = "u.key_sent = ? AND u.key_arn IS NULL"
_READ_RANGE = (
    "SELECT c.seq, e.state FROM {chain} c JOIN {events} e ON e.{nid} = c.notification_id "
    "WHERE c.seq > ? AND c.seq <= ? ORDER BY c.seq"
)
# A PostgreSQL worker reads a range in two steps (the join above looked up each event
# by its id and sorted the range on disk: 88 ms for 20,000 records, these 40 ms): the
# range's chain entries, then their events by id range (ids follow seqs), or by the
# ids themselves when they are scattered.
_READ_CHAIN = "SELECT seq, notification_id FROM {chain} WHERE seq > ? AND seq <= ?"
_READ_EVENTS = "SELECT {nid}, state FROM {events} WHERE {nid} >= ? AND {nid} <= ?"
_READ_EVENTS_BY_ID = "SELECT {nid}, state FROM {events} WHERE {nid} = ANY(?)"
COLUMNS = (
    "seq",
    "ts",
    "time",
    "kind",
    "operation",
    "principal",
    "account",
    "region",
    "source_ip",
    "user_agent",
    "key_arn",
    "source_key_arn",
    "key_sent",
    "context",
    "algorithm",
    "error_code",
    "request_id",
)
#: The numbers of key_arn and principal (``name_number``), after ``COLUMNS`` in the
#: table and in ``prepare``'s rows; queries return ``COLUMNS`` only.
NUMBER_COLUMNS = ("key_no", "principal_no")
TABLE_COLUMNS = COLUMNS + NUMBER_COLUMNS
#: PostgreSQL types of ``TABLE_COLUMNS`` (as the table is created).
_INTEGERS = ("seq", "ts", *NUMBER_COLUMNS)
COLUMN_TYPES = tuple("int8" if c in _INTEGERS else "text" for c in TABLE_COLUMNS)
_KEY_AT, _PRINCIPAL_AT = COLUMNS.index("key_arn"), COLUMNS.index("principal")
_KEY_NAME = itemgetter(len(COLUMNS), _KEY_AT)  # (key_no, key_arn) of a row
_PRINCIPAL_NAME = itemgetter(len(COLUMNS) + 1, _PRINCIPAL_AT)
_ROW = ", ".join(f"u.{c}" for c in COLUMNS)
# (columns, partial-index condition); few indexes keep the rebuild fast.
_INDEXES = {
    # Covering for a key's timeline, denials and per-operation counts (investigate key)
    "kl_usage_key_cov": ("key_no, seq, ts, operation, kind, error_code", None),
    "kl_usage_src": ("source_key_arn, seq", "source_key_arn IS NOT NULL"),
    "kl_usage_sent": ("key_sent, seq", "key_arn IS NULL"),  # calls on unknown keys
    "kl_usage_principal_cov": ("principal_no, seq, key_no, operation", None),
    "kl_usage_error": ("error_code, seq", "error_code IS NOT NULL"),
    "kl_usage_ip": ("source_ip, seq", None),
    # investigate denied: failures in burst order, read from the index alone
    # (and --principal P --error CODE, newest first)
    "kl_usage_fail": ("error_code, principal_no, seq, source_ip, ts", "error_code IS NOT NULL"),
}


#: Indexes of earlier versions, dropped when the index is opened.
_OBSOLETE_INDEXES = (
    "kl_usage_key",
    "kl_usage_key_ts",
    "kl_usage_principal",
    "kl_usage_denied",
    "kl_usage_burst",
)
#: Unique indexes, dropped for a rebuild like the others (the rows stay unique because a
#: batch writes only seqs after the last one in the tables: ``UsageIndex._claim``).
_UNIQUE_INDEXES = {"kl_usage_pairs_key": "pair_no, seq"}  # on CONTEXT


class NameCollision(RuntimeError):
    """Two names (key ARNs, principals, context pairs) have the same ``name_number``."""


def name_number(name: str) -> int:
    """A key ARN's, principal's or context pair's number in the index: the first 8
    bytes of its BLAKE2b digest as a signed 64-bit integer. Stored indexes hold these
    numbers: another function needs a new layout (a rebuild)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _number_of(value: Any, numbers: dict[Any, int | None]) -> int | None:
    """``name_number(value)``, None for a value that is no string; ``numbers``
    caches them."""
    n = numbers.get(value, -1)
    if n == -1:
        n = numbers[value] = name_number(value) if type(value) is str else None
    return n


def _with_numbers(row: tuple[Any, ...], numbers: dict[Any, int | None]) -> tuple[Any, ...]:
    """``row`` with the numbers of its key ARN and principal after it."""
    return (*row, _number_of(row[_KEY_AT], numbers), _number_of(row[_PRINCIPAL_AT], numbers))


def numbered(
    rows: Sequence[tuple[Any, ...]], pairs: Sequence[tuple[str, int]]
) -> tuple[list[tuple[int, int]], list[tuple[int, str]]]:
    """``prepare``'s pairs as ``(number, seq)``, and the distinct ``(number, name)`` of
    those pairs and of the rows' key ARNs and principals. Raises NameCollision when two
    of the names have one number."""
    distinct = set(map(_KEY_NAME, rows))
    distinct.update(map(_PRINCIPAL_NAME, rows))
    numbers = {pair: name_number(pair) for pair in {pair for pair, _ in pairs}}
    distinct.update((no, pair) for pair, no in numbers.items())
    found: dict[int, str] = {}
    for no, name in distinct:
        if no is not None and found.setdefault(no, name) != name:
            raise NameCollision(_collision(no, name, found[no]))
    out = [(numbers[pair], seq) for pair, seq in pairs]
    return out, list(found.items())


def _collision(no: int, name: str, other: object) -> str:
    return f"usage index: {name!r} and {other!r} have the same number {no}; it cannot hold both"


def _reader_spec(db: LedgerDatabase) -> dict[str, Any] | None:
    """psycopg connection arguments for a worker's own connection to ``db``
    (PostgreSQL), or None (SQLite: the writing process reads)."""
    if not db.is_postgres:
        return None
    pool = db.datastore.pool
    kwargs = {k: v for k, v in pool.kwargs.items() if k != "row_factory"}
    get_password = getattr(pool, "get_password_func", None)
    if get_password:
        kwargs["password"] = get_password()
    return kwargs


def _prepare_batch(
    lo: int, hi: int, data: Sequence[tuple[int, bytes]], for_postgres: bool, as_batch: bool
) -> tuple[int, int, int, Batch]:
    """``prepare`` and ``numbered`` a batch; with ``as_batch`` (in a worker, for a
    SQLite ledger) its rows and pairs come as one ``SQLiteBatch`` holding both."""
    rows, pairs, alias_events = prepare(data, for_postgres=for_postgres)
    pair_numbers, names = numbered(rows, pairs)
    if as_batch and not for_postgres:
        tables = ((USAGE, usage_columns(False), rows), (CONTEXT, _PAIR_TYPES, pair_numbers))
        batch = sqlite_batch(tables)
        if batch is not None:  # the writer inserts both tables from it
            return lo, hi, len(data), (batch, batch, alias_events, names)
    return lo, hi, len(data), (rows, pair_numbers, alias_events, names)


_reader: dict[str, Any] = {}  # in a worker: the spec (inherited at fork) and connection


def read_range(conn: Any, sql: Sequence[str], lo: int, hi: int) -> list[tuple[int, bytes]]:
    """``(seq, stored bytes)`` of the chained records with ``lo < seq <= hi``, in seq
    order, over a psycopg connection; ``sql``: ``_READ_CHAIN``, ``_READ_EVENTS`` and
    ``_READ_EVENTS_BY_ID`` for the ledger. As the join: a chain entry without its
    event is left out."""
    chain = sorted(conn.execute(sql[0], (lo, hi)).fetchall())
    if not chain:
        return []
    ids = [int(nid) for _, nid in chain]
    first, last = min(ids), max(ids)
    # Binary: bytea as bytes (the text format doubles it as hex both ends)
    cur = conn.cursor(binary=True)
    if last - first < 2 * len(ids):
        found = cur.execute(sql[1], (first, last)).fetchall()
    else:
        found = cur.execute(sql[2], (ids,)).fetchall()
    states = {int(nid): state for nid, state in found}
    out: list[tuple[int, bytes]] = []
    for (seq, _), nid in zip(chain, ids, strict=True):
        state = states.get(nid)
        if state is not None:
            out.append((int(seq), bytes(state)))
    return out


def read_and_prepare(
    sql: Sequence[str], lo: int, hi: int, for_postgres: bool
) -> tuple[int, int, int, Batch]:
    """In a worker: read the records with ``lo < seq <= hi`` over this process's own
    connection (``read_range``) and ``prepare`` them; returns ``(lo, hi, count,
    batch)``."""
    conn = _reader.get("conn")
    if conn is None:
        import psycopg

        conn = psycopg.connect(**_reader["spec"], autocommit=True)
        # Each worker reads one range at a time: no parallel plans (their helper
        # processes cost more than they bring on a busy machine).
        conn.execute("SET max_parallel_workers_per_gather = 0")
        _reader["conn"] = conn
    data = read_range(conn, sql, lo, hi)
    rows, text_pairs, alias_events = prepare(data, for_postgres=for_postgres)
    pairs, names = numbered(rows, text_pairs)
    # Formatted for COPY here: the writer only streams them (unpickling rows and
    # formatting them there cost it more than the bytes cost to send).
    rows_copy, pairs_copy = copy_rows(rows, COLUMN_TYPES), copy_rows(pairs, ("int8", "int8"))
    if rows_copy is None or pairs_copy is None:  # pragma: no cover - no formatter
        return lo, hi, len(data), (rows, pairs, alias_events, names)
    return lo, hi, len(data), (rows_copy, pairs_copy, alias_events, names)


def _workers_for(behind: int) -> int:
    """Decode processes for indexing ``behind`` records: ``REBUILD_WORKERS`` (at most
    the cores) from ``PARALLEL_MIN_RECORDS`` on, none on one core or below it."""
    if behind < PARALLEL_MIN_RECORDS:
        return 0
    workers = min(REBUILD_WORKERS, os.cpu_count() or 1)
    return workers if workers > 1 else 0


def _fork_pool(workers: int, spec: dict[str, Any] | None) -> Any:
    """A pool of ``workers`` forked processes that read with ``spec`` (if any), or
    None (0 workers, or no fork here). The spec (which may hold a database password)
    reaches the workers by fork, never through a pipe."""
    if workers <= 0:
        return None
    import multiprocessing

    _reader["spec"] = spec
    try:
        return multiprocessing.get_context("fork").Pool(workers)
    except ValueError:  # pragma: no cover - platforms without fork
        return None
    finally:
        _reader.pop("spec", None)


def epoch_us(iso: str) -> int:
    """Microseconds since the epoch of an ISO 8601 timestamp with an offset."""
    d = datetime.fromisoformat(iso)
    return int(d.timestamp()) * 1_000_000 + d.microsecond


#: ``stats`` periods: microseconds per UTC day and hour.
PERIOD_US = {"day": 86_400_000_000, "hour": 3_600_000_000}


def period_number(bucket: str, ts_us: int) -> int:
    """The period of a time, as SQL computes it: ``ts / PERIOD_US[bucket]`` (integer
    division, toward zero). Raises KeyError for an unknown bucket."""
    q = abs(ts_us) // PERIOD_US[bucket]
    return q if ts_us >= 0 else -q


def period_text(bucket: str, number: int) -> str:
    """Period ``number`` as text: the UTC day ``YYYY-MM-DD`` or hour ``YYYY-MM-DDTHH``.
    Raises KeyError for an unknown bucket."""
    start = datetime.fromtimestamp(number * (PERIOD_US[bucket] // 1_000_000), tz=UTC)
    return start.strftime("%Y-%m-%d" if bucket == "day" else "%Y-%m-%dT%H")


def context_pair(key: object, value: object) -> str:
    """The index form of one encryption-context pair: ``<len(key)>:<key>=<value>``
    (the length prefix keeps ``=`` in keys unambiguous)."""
    k = str(key)
    return f"{len(k)}:{k}={value}"


def _first(request: dict[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        value = request.get(name)
        if value is not None:
            return value
    return None


def short_topic(event: dict[str, Any]) -> str:
    """The event's topic without the domain module (``Key.Created``)."""
    topic = str(event.get("topic", ""))
    return topic[len(_TOPIC_PREFIX) :] if topic.startswith(_TOPIC_PREFIX) else topic


def usage_row(seq: int, event: dict[str, Any], share: Callable[[Any], Any]) -> tuple[Any, ...]:
    """The index row of one decoded stored event (columns as ``COLUMNS``); ``share``
    maps each value that repeats across rows to one object."""
    call = event.get("call") or {}
    request = event.get("request") or {}
    additional = event.get("additional") or {}
    ctx = _first(request, _CONTEXT_FIELDS)
    sent = _first(request, _KEY_SENT_FIELDS)
    algorithm = _first(request, _ALGORITHM_FIELDS)
    get = call.get
    return (
        seq,
        epoch_us(event["timestamp"]),
        event["timestamp"],
        share(short_topic(event)),
        share(get("operation")),
        share(get("principal")),
        share(get("account_id")),
        share(get("region")),
        share(get("source_ip")),
        share(get("user_agent")),
        share(event.get("key_arn")),
        share(additional.get("sourceKeyArn")) if isinstance(additional, dict) else None,
        share(sent) if isinstance(sent, str) else None,
        share(orjson.dumps(ctx, option=orjson.OPT_SORT_KEYS).decode()) if ctx else None,
        share(algorithm) if isinstance(algorithm, str) else None,
        share(event.get("error_code")),
        get("request_id"),
    )


#: Index rows (``TABLE_COLUMNS``), context pairs, alias-changing events.
Prepared = tuple[list[tuple[Any, ...]], list[tuple[str, int]], list[tuple[int, dict[str, Any]]]]
#: Rows, pairs as numbers (``numbered``; both formatted for COPY, from a PostgreSQL
#: worker; or both in one SQLiteBatch, from a SQLite worker; or as they are),
#: alias-changing events, and the names of the numbers.
Batch = tuple[
    list[tuple[Any, ...]] | CopyData | SQLiteBatch,
    list[tuple[int, int]] | CopyData | SQLiteBatch,
    list[tuple[int, dict[str, Any]]],
    list[tuple[int, str]],
]
#: A stored event whose text holds a NUL (JSON can only write it escaped)
_JSON_NUL = b"\\u0000"


def prepare_reference(
    records: Sequence[tuple[Any, Any]], *, for_postgres: bool = False
) -> Prepared:
    """``prepare`` by decoding each whole event to a dict: the definition ``prepare``
    follows, and its fallback for events outside the fast path's shape."""
    rows: list[tuple[Any, ...]] = []
    pairs: list[tuple[str, int]] = []
    alias_events: list[tuple[int, dict[str, Any]]] = []
    loads = orjson.loads
    shared: dict[Any, Any] = {}
    numbers: dict[Any, int | None] = {}

    def share(value: Any) -> Any:
        # One object per repeated value: a worker's result pickles by reference.
        return shared.setdefault(value, value)

    for seq, data in records:
        raw = bytes(data) if isinstance(data, memoryview) else data
        event = loads(raw)
        row = usage_row(seq, event, share)
        row_pairs: list[tuple[str, int]] = []
        request = event.get("request")
        if request:
            for name in _CONTEXT_FIELDS:
                ctx = request.get(name)
                if ctx and isinstance(ctx, dict):
                    row_pairs.extend((share(context_pair(k, v)), seq) for k, v in ctx.items())
        if for_postgres and _JSON_NUL in raw:
            row = pg_text_row(row)
            row_pairs = [pg_text_row(pair) for pair in row_pairs]
        rows.append(_with_numbers(row, numbers))
        pairs.extend(row_pairs)
        topic = short_topic(event)
        if topic.startswith("Alias.") or topic == "Key.Deleted":
            alias_events.append((seq, event))
    return rows, list(dict.fromkeys(pairs)), alias_events


# The fields ``usage_row`` reads, as msgspec structs: decoding skips every other field
# and builds no dicts (``prepare`` spent most of its time in ``orjson.loads``). Any JSON
# value is accepted where ``usage_row`` takes any; an event of another shape (say a
# "call" that is no object) fails validation and goes through ``prepare_reference``.
class _Call(msgspec.Struct, gc=False):
    operation: Any = None
    principal: Any = None
    account_id: Any = None
    region: Any = None
    source_ip: Any = None
    user_agent: Any = None
    request_id: Any = None


class _Request(msgspec.Struct, gc=False):
    keyId: Any = None
    destinationKeyId: Any = None
    targetKeyId: Any = None
    encryptionContext: Any = None
    destinationEncryptionContext: Any = None
    encryptionAlgorithm: Any = None
    destinationEncryptionAlgorithm: Any = None
    signingAlgorithm: Any = None
    macAlgorithm: Any = None
    keyAgreementAlgorithm: Any = None
    keyPairSpec: Any = None
    keySpec: Any = None


class _Additional(msgspec.Struct, gc=False):
    sourceKeyArn: Any = None


class _Event(msgspec.Struct, gc=False):
    timestamp: Any
    topic: Any = ""
    call: _Call | None = None
    request: _Request | None = None
    additional: _Additional | None = None
    key_arn: Any = None
    error_code: Any = None


_decode_event = msgspec.json.Decoder(_Event).decode
_NO_CALL = _Call()
_NO_REQUEST = _Request()
_FALLBACK = (msgspec.ValidationError, msgspec.DecodeError)


def _minute_us(prefix: str) -> int | None:
    """Microseconds since the epoch of ``YYYY-MM-DDTHH:MM`` in UTC, None when that is
    no such minute or one before 1970 (``epoch_us`` truncates those toward zero)."""
    try:
        us = epoch_us(prefix + ":00+00:00")
    except ValueError:
        return None
    return us if us >= 0 else None


def prepare(records: Sequence[tuple[Any, Any]], *, for_postgres: bool = False) -> Prepared:
    """Index rows, context pairs and alias-changing events of ``(seq, bytes)``
    records: the CPU half of indexing, which a worker process can do. With
    ``for_postgres``, NUL in text is U+FFFD already (PostgreSQL text cannot hold it;
    ``SqlCursor`` maps lookups the same way), so rows go to COPY as they are.

    Gives what ``prepare_reference`` gives (tests compare them); raises what it raises
    on a record that is no event."""
    rows: list[tuple[Any, ...]] = []
    pairs: list[tuple[str, int]] = []
    alias_events: list[tuple[int, dict[str, Any]]] = []
    shared: dict[Any, Any] = {}
    share = shared.setdefault  # one object per repeated value: results pickle smaller
    dumps, sort_keys = orjson.dumps, orjson.OPT_SORT_KEYS
    # The ledger writes timestamps as YYYY-MM-DDTHH:MM:SS.ffffff+00:00: the minute's
    # epoch is looked up, the rest read as one number (any other form: epoch_us).
    minutes: dict[str, int | None] = {}
    numbers: dict[Any, int | None] = {}  # name_number() of key ARNs and principals
    # A context's sorted text and context_pair()s, by its JSON as given
    contexts: dict[bytes, tuple[str, list[str] | None]] = {}
    skip = len(_TOPIC_PREFIX)
    for seq, data in records:
        raw = bytes(data) if isinstance(data, memoryview) else data
        try:
            e = _decode_event(raw)
        except _FALLBACK:
            r, p, a = prepare_reference([(seq, raw)], for_postgres=for_postgres)
            rows += r
            pairs += p
            alias_events += a
            continue
        call = e.call or _NO_CALL
        req = e.request or _NO_REQUEST
        topic = str(e.topic)
        kind = topic[skip:] if topic.startswith(_TOPIC_PREFIX) else topic
        time = e.timestamp
        ts = None
        if type(time) is str and len(time) == 32 and time[26:] == "+00:00" and time[19] == ".":
            digits = time[17:19] + time[20:26]  # seconds and microseconds
            if time[16] == ":" and digits < "60" and digits.isdigit() and digits.isascii():
                minute = minutes.get(time[:16], -1)
                if minute == -1:
                    minute = minutes[time[:16]] = _minute_us(time[:16])
                if minute is not None:
                    ts = minute + int(digits)
        if ts is None:
            ts = epoch_us(time)
        sent = req.keyId
        if sent is None:
            sent = req.destinationKeyId if req.destinationKeyId is not None else req.targetKeyId
        ctx = req.encryptionContext
        if ctx is None:
            ctx = req.destinationEncryptionContext
        algorithm = req.encryptionAlgorithm
        if algorithm is None:
            for algorithm in (
                req.destinationEncryptionAlgorithm,
                req.signingAlgorithm,
                req.macAlgorithm,
                req.keyAgreementAlgorithm,
                req.keyPairSpec,
                req.keySpec,
            ):
                if algorithm is not None:
                    break
        add = e.additional
        text = names = None
        if ctx:  # its sorted text and pairs, once per context in the batch
            seen = contexts.get(key := dumps(ctx))  # the context as given (key order)
            if seen is None:
                text = dumps(ctx, option=sort_keys).decode()
                if type(ctx) is dict:
                    names = [share(p, p) for p in (f"{len(k)}:{k}={v}" for k, v in ctx.items())]
                seen = contexts[key] = (share(text, text), names)
            text, names = seen
        principal, key_arn = call.principal, e.key_arn
        row: tuple[Any, ...] = (
            seq,
            ts,
            time,
            share(kind, kind),
            share(call.operation, call.operation),
            share(principal, principal),
            share(call.account_id, call.account_id),
            share(call.region, call.region),
            share(call.source_ip, call.source_ip),
            share(call.user_agent, call.user_agent),
            share(key_arn, key_arn),
            share(add.sourceKeyArn, add.sourceKeyArn) if add is not None else None,
            share(sent, sent) if type(sent) is str else None,
            text,
            share(algorithm, algorithm) if type(algorithm) is str else None,
            share(e.error_code, e.error_code),
            call.request_id,
            _number_of(key_arn, numbers),
            _number_of(principal, numbers),
        )
        row_pairs: list[tuple[str, int]] = []
        first, second = req.encryptionContext, req.destinationEncryptionContext
        for c in (first, second) if second else (first,):
            if c is ctx:
                if names:
                    row_pairs += [(name, seq) for name in names]
            elif c and type(c) is dict:  # context_pair() of each (JSON keys are str)
                row_pairs += [(f"{len(k)}:{k}={v}", seq) for k, v in c.items()]
        if second and first:  # a pair in both contexts is one row
            row_pairs = list(dict.fromkeys(row_pairs))
        if for_postgres and b"\\" in raw and _JSON_NUL in raw:  # memchr first
            row = _with_numbers(pg_text_row(row[: len(COLUMNS)]), numbers)  # the mapped text
            row_pairs = [pg_text_row(pair) for pair in row_pairs]
        rows.append(row)
        pairs += row_pairs
        if kind.startswith("Alias.") or kind == "Key.Deleted":
            alias_events.append((seq, orjson.loads(raw)))
    return rows, pairs, alias_events


def _sqlite_pragma(c: SqlCursor, name: str, value: object) -> object:
    """Set a (trusted) SQLite pragma of this connection; return its previous value."""
    row = c.execute(f"PRAGMA {name}").fetchone()
    c.execute(f"PRAGMA {name} = {value}")
    return None if row is None else next(iter(dict(row).values()))


def _key_prefix(alias_arn: str) -> str:
    return alias_arn.split(":alias/", 1)[0] + ":key/"


@dataclass
class Filters:
    """``audit trail`` filters; every given one must match (``operations``: any of)."""

    key_arns: Sequence[str] = ()  # resolved keys (any of); matches the ReEncrypt source too
    alias_arn: str | None = None  # the key the alias named at each call's time
    key_sent: str | None = None  # KeyId as sent, for calls that resolved to no key
    principal: str | None = None
    operations: Sequence[str] = ()
    since_us: int | None = None
    until_us: int | None = None
    error: bool = False
    error_code: str | None = None
    context: Sequence[tuple[str, str]] = ()
    source_ip: str | None = None
    lifecycle: bool = False  # only events that change state (not ApiCall records)
    limit: int | None = None  # the last N matches


def _text_type(postgres: bool) -> str:
    # Text compares byte by byte, as on SQLite: PostgreSQL's default collation
    # (C.UTF-8 here) sorted index keys through strcoll, a fifth of the time of
    # building the indexes. Lookups are by equality, which is byte equality either way.
    return 'TEXT COLLATE "C"' if postgres else "TEXT"


def usage_columns(postgres: bool) -> str:
    """The column definitions of the usage table (``TABLE_COLUMNS``)."""
    # On SQLite seq is the rowid (no separate primary-key index).
    types = {
        "seq": "BIGINT PRIMARY KEY" if postgres else "INTEGER PRIMARY KEY",
        "ts": "BIGINT NOT NULL",
        "key_no": "BIGINT",
        "principal_no": "BIGINT",
    }
    text = _text_type(postgres)
    return ", ".join(f"{c} {types.get(c, text)}" for c in TABLE_COLUMNS)


PAIR_COLUMNS = ("pair_no", "seq")
_PAIR_TYPES = "pair_no BIGINT NOT NULL, seq BIGINT NOT NULL"


class UsageIndex:
    """The usage index and alias history over a ledger database."""

    name = "usage"

    def __init__(self, db: LedgerDatabase, *, batch_size: int = 5000) -> None:
        self.db = db
        self.usage = db.table(USAGE)
        self.context = db.table(CONTEXT)
        self.aliases = db.table(ALIAS_HISTORY)
        self.names = db.table(NAMES)
        self.batch_size = batch_size
        self._lock = threading.Lock()
        text = _text_type(db.is_postgres)
        with db.ddl_transaction() as c:
            self._drop_obsolete_tables(c)
            c.execute(f"CREATE TABLE IF NOT EXISTS {self.usage} ({usage_columns(db.is_postgres)})")
            # No primary key: its unique index is built after a bulk load (sorted, once)
            c.execute(f"CREATE TABLE IF NOT EXISTS {self.context} ({_PAIR_TYPES})")
            c.execute(
                f"CREATE TABLE IF NOT EXISTS {self.aliases} (alias_id {text} NOT NULL, "
                f"alias_arn {text} NOT NULL, "
                f"key_arn {text}, from_seq BIGINT NOT NULL, to_seq BIGINT, "
                "PRIMARY KEY (alias_id, from_seq))"
            )
            c.execute(
                f"CREATE TABLE IF NOT EXISTS {self.names} (no BIGINT PRIMARY KEY, "
                f"name {text} NOT NULL UNIQUE)"
            )
            self._create_indexes(c)

    def _drop_obsolete_tables(self, c: SqlCursor) -> None:
        """An index written by an earlier version (another table layout, or on
        PostgreSQL text in the database's collation) is dropped with its position; the
        next catch-up rebuilds it from the log."""
        obsolete: list[str] = []
        for name in _OBSOLETE_TABLES:
            table = self.db.table(name)
            if self.db.is_postgres:
                row = c.execute("SELECT to_regclass(?) IS NOT NULL AS there", (table,)).fetchone()
            else:
                row = c.execute(
                    "SELECT COUNT(*) > 0 AS there FROM sqlite_master WHERE type = 'table' "
                    "AND name = ?",
                    (name,),
                ).fetchone()
            if row is not None and row["there"]:
                obsolete.append(table)
        if self.db.is_postgres:  # text columns in another collation than "C"
            row = c.execute(
                "SELECT COUNT(*) AS n FROM pg_attribute a JOIN pg_collation l "
                "ON l.oid = a.attcollation WHERE a.attrelid IN "
                "(to_regclass(?), to_regclass(?), to_regclass(?), to_regclass(?)) "
                "AND a.attnum > 0 AND NOT a.attisdropped AND l.collname <> 'C'",
                (self.usage, self.context, self.aliases, self.names),
            ).fetchone()
            if row is not None and row["n"]:
                obsolete.append(self.usage)
        for table, column in ((self.usage, "principal_no"), (self.context, "pair_no")):
            if self.db.is_postgres:  # before numbered names
                row = c.execute(
                    "SELECT to_regclass(?) IS NOT NULL AND NOT EXISTS (SELECT 1 FROM "
                    "pg_attribute WHERE attrelid = to_regclass(?) AND attname = ? "
                    "AND NOT attisdropped) AS old",
                    (table, table, column),
                ).fetchone()
            else:
                row = c.execute(
                    "SELECT COUNT(*) > 0 AND SUM(name = ?) = 0 AS old FROM pragma_table_info(?)",
                    (column, table),
                ).fetchone()
            if row is not None and row["old"]:
                obsolete.append(table)
        if obsolete:
            for t in (*obsolete, self.usage, self.context, self.aliases, self.names):
                c.execute(f"DROP TABLE IF EXISTS {t}")
            c.execute("DELETE FROM {positions} WHERE name = ?", (POSITION_NAME,))

    def _create_indexes(self, c: SqlCursor) -> None:
        for name in _OBSOLETE_INDEXES:
            c.execute(self._drop_index(name))
        for name, columns in _UNIQUE_INDEXES.items():
            c.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {name} ON {self.context} ({columns})")
        for name, (columns, where) in _INDEXES.items():
            partial = f" WHERE {where}" if where else ""
            c.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {self.usage} ({columns}){partial}")
        c.execute(f"CREATE INDEX IF NOT EXISTS kl_alias_hist_key ON {self.aliases} (key_arn)")
        c.execute(f"CREATE INDEX IF NOT EXISTS kl_alias_hist_arn ON {self.aliases} (alias_arn)")

    @property
    def position(self) -> int:
        return self.db.get_position(POSITION_NAME)

    # ---------------------------------------------------------------- building

    def catch_up(
        self,
        progress: Callable[[int, int], None] | None = None,
        *,
        workers: int | None = None,
        batch_size: int | None = None,
    ) -> int:
        """Index every record after the tracked position; return how many were read.

        ``progress(done, head)`` is called after each batch. With ``workers`` > 0,
        that many forked processes decode batches (on PostgreSQL each also reads its
        range of seqs over its own connection) while this one writes them in order
        (at most ``workers + 2`` in flight), in batches of ``REBUILD_BATCH`` unless
        ``batch_size`` says otherwise. ``workers`` None: ``REBUILD_WORKERS`` when at
        least ``PARALLEL_MIN_RECORDS`` records are behind (and the machine has more
        than one core), else none. Forks: call it from a process whose other threads
        hold no lock the workers need (the CLI; not a threaded server).
        """
        done = 0
        for_postgres = self.db.is_postgres
        with self._lock:
            position = self.db.get_position(POSITION_NAME)
            head = self.db.head_seq()
            if workers is None:
                workers = _workers_for(head - position)
            batch = batch_size or (REBUILD_BATCH if workers else self.batch_size)
            # PostgreSQL: workers read too. SQLite: this process reads (a second reader
            # holds back WAL checkpoints while this one writes, which cost more).
            spec = _reader_spec(self.db) if workers > 0 else None
            pool = _fork_pool(workers, spec)
            range_sql = [self.db.sql(q) for q in (_READ_CHAIN, _READ_EVENTS, _READ_EVENTS_BY_ID)]
            in_flight: deque[Any] = deque()
            try:
                while True:
                    if pool is not None and spec is not None:
                        while len(in_flight) < workers + 2 and position < head:
                            hi = min(position + batch, head)
                            args = (range_sql, position, hi, for_postgres)
                            in_flight.append(pool.apply_async(read_and_prepare, args))
                            position = hi
                        if not in_flight:
                            head = self.db.head_seq()  # appended meanwhile?
                            if position < head:
                                continue
                            return done
                        lo, upto, n, prepared = in_flight.popleft().get()
                    else:
                        while len(in_flight) < (workers + 2 if pool else 1):
                            if position >= head:
                                head = self.db.head_seq()  # appended meanwhile?
                                if position >= head:
                                    break
                            # Bounded above: PostgreSQL's estimate for "seq > N" alone
                            # chose parallel scans (10+ ms even with nothing to read).
                            hi = min(position + batch, head)
                            with self.db.transaction(commit=False) as c:
                                records = c.select_values(_READ_RANGE, (position, hi))
                            # SQLite gives int and bytes already (0.6 s a million)
                            data = (
                                [(int(q), bytes(b)) for q, b in records]
                                if for_postgres
                                else records
                            )
                            job: Any = (
                                pool.apply_async(
                                    _prepare_batch, (position, hi, data, for_postgres, True)
                                )
                                if pool
                                else _prepare_batch(position, hi, data, for_postgres, False)
                            )
                            in_flight.append(job)
                            position = hi
                        if not in_flight:
                            return done
                        job = in_flight.popleft()
                        lo, upto, n, prepared = job.get() if pool else job
                    attach = prepared[0] if isinstance(prepared[0], SQLiteBatch) else None
                    with self.db.transaction_with(attach) as c:
                        if n:
                            self._write(c, prepared, lo, self._claim(c))
                        c.execute(
                            "INSERT INTO {positions} (name, position) VALUES (?, ?) "
                            "ON CONFLICT (name) DO UPDATE SET position = excluded.position "
                            "WHERE {positions}.position < excluded.position",
                            (POSITION_NAME, upto),
                        )
                    done += n
                    if progress is not None:
                        progress(upto, max(head, upto))
            finally:
                if pool is not None:
                    pool.terminate()

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Drop the index and rebuild it from the whole log; return records read.

        Secondary indexes are dropped for the bulk load and made again at the end; a
        rebuild killed midway leaves rows consistent with the saved position, and the
        next rebuild (or catch-up) completes it to the same tables.
        """
        with self._lock, self.db.transaction(commit=True) as c:
            if not self.db.is_postgres:
                # Freed pages are not zeroed first (Debian builds SQLite with secure
                # delete on): the rows hold no secret and come back from the log.
                secure = _sqlite_pragma(c, "secure_delete", "FAST")
            for name in (*_INDEXES, *_UNIQUE_INDEXES, "kl_alias_hist_key", "kl_alias_hist_arn"):
                c.execute(self._drop_index(name))  # first: rows then go without upkeep
            for table in (self.usage, self.context, self.aliases, self.names):
                c.execute(f"{'TRUNCATE' if self.db.is_postgres else 'DELETE FROM'} {table}")
            c.execute("DELETE FROM {positions} WHERE name = ?", (POSITION_NAME,))
            if not self.db.is_postgres:
                _sqlite_pragma(c, "secure_delete", secure)
        n = self.catch_up(progress)
        with self.db.ddl_transaction() as c:
            if self.db.is_postgres:  # sorts for the index builds in memory
                c.execute("SET LOCAL maintenance_work_mem = '256MB'")
            else:  # the index builds sort with a helper thread
                threads = _sqlite_pragma(c, "threads", min(REBUILD_WORKERS, os.cpu_count() or 1))
            self._create_indexes(c)
            if not self.db.is_postgres:
                _sqlite_pragma(c, "threads", threads)
        if self.db.is_postgres:
            self._vacuum_analyze()
        return n

    def _vacuum_analyze(self) -> None:
        """PostgreSQL: VACUUM ANALYZE the tables after a bulk load. Statistics: without
        them the planner chose plans 2-16x slower. The visibility map: without it the
        covering indexes still read every row's heap page. VACUUM runs outside a
        transaction, so on its own connection."""
        import psycopg

        spec = _reader_spec(self.db)
        assert spec is not None
        with psycopg.connect(**spec, autocommit=True) as conn:
            for table in (self.usage, self.context, self.aliases, self.names):
                conn.execute(f"VACUUM ANALYZE {table}")

    def _drop_index(self, name: str) -> str:
        if self.db.is_postgres:
            schema = self.usage.rsplit(".", 1)[0]
            return f"DROP INDEX IF EXISTS {schema}.{name}"
        return f"DROP INDEX IF EXISTS {name}"

    def _claim(self, c: SqlCursor) -> int:
        """The last seq in the tables, read inside the caller's write transaction
        after taking the index's write lock (PostgreSQL; SQLite has one writer at a
        time). Every batch is written whole with the position, from a position no
        greater than this, so the tables hold every seq up to it and none after:
        a batch writes only its seqs after it."""
        if self.db.is_postgres:
            c.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_ID,))
        row = c.execute(f"SELECT MAX(seq) AS seq FROM {self.usage}").fetchone()
        return 0 if row is None or row["seq"] is None else int(row["seq"])

    def _apply(self, c: SqlCursor, records: Sequence[tuple[Any, Any]]) -> None:
        """Index ``(seq, stored bytes)`` records (in seq order) inside the caller's
        transaction; those already indexed are skipped."""
        if records:
            rows, text_pairs, alias_events = prepare(records, for_postgres=self.db.is_postgres)
            pairs, names = numbered(rows, text_pairs)
            batch = (rows, pairs, alias_events, names)
            self._write(c, batch, int(records[0][0]) - 1, self._claim(c))

    def _write(self, c: SqlCursor, prepared: Batch, lo: int, claimed: int) -> None:
        """Write a batch of seqs after ``lo``: only those after ``claimed`` (the last
        seq already in the tables), copied straight in when that is all of them.
        Raises NameCollision (and writes nothing) when a name's number is another's."""
        rows, pairs, alias_events, names = prepared
        self._add_names(c, names)
        after = None if claimed <= lo else claimed
        # On PostgreSQL, prepare() has mapped NUL already. A SQLiteBatch is attached by
        # the caller (transaction_with).
        c.insert_new(self.usage, TABLE_COLUMNS, rows, after_seq=after)
        if pairs:
            c.insert_new(self.context, PAIR_COLUMNS, pairs, after_seq=after)
        for seq, event in alias_events:
            if after is None or seq > after:
                self._apply_alias(c, seq, event)

    def _add_names(self, c: SqlCursor, names: Sequence[tuple[int, str]]) -> None:
        """Store the ``(number, name)`` pairs not stored yet; raises NameCollision when
        a number is stored with another name (the caller's transaction then rolls
        back). A name's number never changes, so the table only grows."""
        if not names:
            return
        c.executemany(
            f"INSERT INTO {self.names} (no, name) VALUES (?, ?) ON CONFLICT DO NOTHING", names
        )
        select = f"SELECT no, name FROM {self.names} WHERE"
        stored = dict(self._select_in(c, select, "no", [no for no, _ in names]))
        for no, name in names:
            if stored.get(no) != name:
                raise NameCollision(_collision(no, name, stored.get(no)))

    def _select_in(
        self, c: SqlCursor, select: str, column: str, values: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        """The rows of ``select`` (which ends in WHERE) with ``column`` in ``values``:
        one array parameter on PostgreSQL (chunks of 500 marks cost it 5 ms each),
        chunks of 500 marks on SQLite."""
        if not values:
            return []
        if self.db.is_postgres:
            return c.select_values(f"{select} {column} = ANY(?)", [list(values)])
        out: list[tuple[Any, ...]] = []
        for i in range(0, len(values), 500):
            chunk = values[i : i + 500]
            marks = ", ".join("?" for _ in chunk)
            out += c.select_values(f"{select} {column} IN ({marks})", chunk)
        return out

    def _apply_alias(self, c: SqlCursor, seq: int, event: dict[str, Any]) -> None:
        topic = str(event["topic"])
        if topic.endswith("Key.Deleted"):
            c.execute(
                f"UPDATE {self.aliases} SET to_seq = ? WHERE key_arn = ? AND to_seq IS NULL "
                "AND from_seq < ?",
                (seq, event["key_arn"], seq),
            )
            return
        alias_id = str(event["originator_id"])
        alias_arn = event.get("alias_arn")  # only Alias.Created names it
        if alias_arn is None:
            row = c.execute(
                f"SELECT alias_arn FROM {self.aliases} WHERE alias_id = ? LIMIT 1", (alias_id,)
            ).fetchone()
            if row is None:
                return
            alias_arn = row["alias_arn"]
        c.execute(
            f"UPDATE {self.aliases} SET to_seq = ? WHERE alias_id = ? AND to_seq IS NULL "
            "AND from_seq < ?",
            (seq, alias_id, seq),
        )
        target = event.get("target_key_id")
        if not topic.endswith(".Deleted") and target:
            c.execute(
                f"INSERT INTO {self.aliases} (alias_id, alias_arn, key_arn, from_seq, to_seq) "
                "VALUES (?, ?, ?, ?, NULL) ON CONFLICT DO NOTHING",
                (alias_id, alias_arn, _key_prefix(alias_arn) + str(target), seq),
            )

    def snapshot(self) -> list[tuple[Any, ...]]:
        """Every row of the three tables, in a fixed order, for comparing rebuilds."""
        with self.db.transaction(commit=False) as c:
            out: list[tuple[Any, ...]] = []
            for table, order in (
                (self.usage, "seq"),
                (self.context, "pair_no, seq"),
                (self.aliases, "alias_id, from_seq"),
                (self.names, "no"),
            ):
                rows = c.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
                out.extend((table.rsplit(".", 1)[-1], *dict(r).values()) for r in rows)
        return out

    # ---------------------------------------------------------------- queries

    def _is_named(self, column: str, count: int = 1) -> str:
        """SQL: ``column`` (key_no, principal_no or pair_no) is the stored number of
        one of ``count`` names (a ``?`` each): a name not stored matches nothing."""
        if count == 1:
            return f"{column} = (SELECT n.no FROM {self.names} n WHERE n.name = ?)"
        marks = ", ".join("?" for _ in range(count))
        return f"{column} IN (SELECT n.no FROM {self.names} n WHERE n.name IN ({marks}))"

    def _names_of(self, c: SqlCursor, numbers: Iterable[Any]) -> dict[Any, str]:
        """The names of stored ``numbers`` (None maps to None)."""
        wanted = sorted({n for n in numbers if n is not None})
        out: dict[Any, Any] = {None: None}
        out.update(self._select_in(c, f"SELECT no, name FROM {self.names} WHERE", "no", wanted))
        return out

    def _key_parts(self, f: Filters) -> list[tuple[str, list[Any]]]:
        """The key filters as (clause, params) alternatives; a row matches any."""
        parts: list[tuple[str, list[Any]]] = []
        if f.key_arns:
            marks = ", ".join("?" for _ in f.key_arns)
            named = self._is_named("u.key_no", len(f.key_arns))
            parts.append(
                (
                    f"{named} OR u.source_key_arn IN ({marks})",
                    [*f.key_arns, *f.key_arns],
                )
            )
        if f.alias_arn:
            # Each period the alias named a key, then that key's calls in it.
            parts.append(
                (
                    f"u.seq IN (SELECT a.seq FROM {self.aliases} h JOIN {self.names} n "
                    f"ON n.name = h.key_arn JOIN {self.usage} a "
                    "ON a.key_no = n.no AND a.seq > h.from_seq "
                    "AND (h.to_seq IS NULL OR a.seq <= h.to_seq) WHERE h.alias_arn = ?)",
                    [f.alias_arn],
                )
            )
        if f.key_sent:
            # KeyId as sent finds calls that resolved to no key (unknown ids,
            # aliases); calls that resolved are found by their key.
            parts.append((_SENT_CLAUSE, [f.key_sent]))
        return parts

    def _key_branches(self, key_arns: Sequence[str]) -> list[list[tuple[str, list[Any]]]]:
        """``key_arns`` as two disjoint key filters: calls on the keys, and ReEncrypts
        from them to other keys."""
        keys = list(key_arns)
        marks = ", ".join("?" for _ in keys)
        return [
            [(self._is_named("u.key_no", len(keys)), keys)],
            [
                (
                    f"u.source_key_arn IN ({marks}) AND "
                    f"(u.key_arn IS NULL OR u.key_arn NOT IN ({marks}))",
                    keys + keys,
                )
            ],
        ]

    def _where(
        self, f: Filters, key_parts: Sequence[tuple[str, list[Any]]] | None = None
    ) -> tuple[str, list[Any]]:
        """SQL for ``f``; ``key_parts`` replaces its key filters when given."""
        clauses: list[str] = []
        params: list[Any] = []
        parts = self._key_parts(f) if key_parts is None else key_parts
        if parts:
            clauses.append("(" + " OR ".join(f"({p})" for p, _ in parts) + ")")
            for _, p in parts:
                params.extend(p)
        if f.principal:
            clauses.append(self._is_named("u.principal_no"))
            params.append(f.principal)
        if f.operations:
            clauses.append(f"u.operation IN ({', '.join('?' for _ in f.operations)})")
            params.extend(f.operations)
        if f.since_us is not None:
            clauses.append("u.ts >= ?")
            params.append(f.since_us)
        if f.until_us is not None:
            clauses.append("u.ts <= ?")
            params.append(f.until_us)
        if f.error_code:
            # With a key filter, SQLite (no statistics) preferred the error index and
            # looked up every failure of that code; "+" keeps it on the key's index.
            plus = "+" if parts and not self.db.is_postgres else ""
            clauses.append(f"{plus}u.error_code = ?")
            params.append(f.error_code)
        elif f.error:
            clauses.append("u.error_code IS NOT NULL")
        for k, v in f.context:
            pair = self._is_named("x.pair_no")
            clauses.append(f"u.seq IN (SELECT x.seq FROM {self.context} x WHERE {pair})")
            params.append(context_pair(k, v))
        if f.source_ip:
            clauses.append("u.source_ip = ?")
            params.append(f.source_ip)
        if f.lifecycle:
            clauses.append("substr(u.kind, 1, 8) <> 'ApiCall.'")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def trail(self, f: Filters) -> list[dict[str, Any]]:
        """The matching rows in seq order (the last ``f.limit`` when given)."""
        self.catch_up()
        with self.db.transaction(commit=False) as c:
            if f.limit is not None and (f.key_arns or f.alias_arn or f.key_sent):
                return self._last_by_key(c, f, f.limit)
            if f.key_arns and not f.alias_arn and not f.key_sent:
                # The keys' calls, then ReEncrypts from them to other keys: each from
                # its own index (an OR of the two looked up every row in the table).
                # Seqs first, then their rows: the key's covering index answers filters
                # on time, operation, kind and error alone (PostgreSQL read every row
                # of the key to find its few lifecycle events: 85 ms against 5).
                found: set[int] = set()
                for parts in self._key_branches(f.key_arns):
                    where, params = self._where(f, parts)
                    sql = f"SELECT u.seq FROM {self.usage} u{where}"
                    found.update(int(r[0]) for r in c.select_values(sql, params))
                return self._rows_at(c, sorted(found))
            where, params = self._where(f)
            sql = f"SELECT {_ROW} FROM {self.usage} u{where} ORDER BY u.seq"
            if f.limit is not None:
                sql = f"SELECT * FROM (SELECT {_ROW} FROM {self.usage} u{where} "
                sql += "ORDER BY u.seq DESC LIMIT ?) t ORDER BY seq"
                params.append(f.limit)
            return [dict(r) for r in c.execute(sql, params).fetchall()]

    def _last_by_key(self, c: SqlCursor, f: Filters, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` rows of a key-filtered trail, in seq order.

        Each key alternative (one key's calls, its ReEncrypt sources, one period of an
        alias, KeyId as sent) is read newest first from its own index with its own
        limit, and the results are merged: the planners joined an OR of these into one
        scan and sort of every row of the key.
        """
        parts: list[tuple[str, list[Any]]] = []
        for arn in f.key_arns:
            parts.append((self._is_named("u.key_no"), [arn]))
            parts.append(("u.source_key_arn = ?", [arn]))
        if f.key_sent:
            parts.append((_SENT_CLAUSE, [f.key_sent]))
        found: set[int] = set()

        def newest(clause: str, args: list[Any]) -> int:
            # Seqs only (from the index); the rows are read for the last ``limit``
            where, params = self._where(f, [(clause, args)])
            sql = f"SELECT u.seq FROM {self.usage} u{where} ORDER BY u.seq DESC LIMIT ?"
            seqs = [int(r[0]) for r in c.select_values(sql, [*params, limit])]
            found.update(seqs)
            return len(seqs)

        for clause, args in parts:
            newest(clause, args)
        if f.alias_arn:
            periods = c.execute(
                f"SELECT key_arn, from_seq, to_seq FROM {self.aliases} "
                "WHERE alias_arn = ? AND key_arn IS NOT NULL ORDER BY from_seq DESC",
                (f.alias_arn,),
            ).fetchall()
            got = 0
            for p in periods:  # newest first; periods of one alias ARN never overlap
                clause = self._is_named("u.key_no") + " AND u.seq > ?"
                args = [p["key_arn"], p["from_seq"]]
                if p["to_seq"] is not None:
                    clause += " AND u.seq <= ?"
                    args.append(p["to_seq"])
                got += newest(clause, args)
                if got >= limit:
                    break
        return self._rows_at(c, sorted(found)[-limit:])

    def _rows_at(self, c: SqlCursor, seqs: Sequence[int]) -> list[dict[str, Any]]:
        """The rows of ``seqs``, in seq order."""
        found = self._select_in(c, f"SELECT {_ROW} FROM {self.usage} u WHERE", "u.seq", seqs)
        return [dict(zip(COLUMNS, r, strict=True)) for r in sorted(found, key=itemgetter(0))]

    def stats(
        self, f: Filters, by: str, bucket: str | None = None, top: int | None = None
    ) -> list[dict[str, Any]]:
        """Counts per ``by`` (key, principal, operation, error, source_ip) and, with
        ``bucket`` ("day" or "hour"), per period; first and last use of each group;
        ordered by count (descending), then group. Raises ValueError on a bad ``by``."""
        column = {
            "key": "u.key_no",  # numbers: named after the counting
            "principal": "u.principal_no",
            "operation": "u.operation",
            "error": "u.error_code",
            "source_ip": "u.source_ip",
        }.get(by)
        if column is None:
            raise ValueError(f"unknown grouping {by!r}")
        self.catch_up()
        period = "''"
        if bucket in PERIOD_US:
            # From ts, which the covering key index holds (the time text is in the table)
            period = f"(u.ts / {PERIOD_US[bucket]})"
        elif bucket is not None:
            raise ValueError(f"unknown bucket {bucket!r}")
        # Keys only: their calls, then ReEncrypts from them to other keys (disjoint
        # sets, each read from its own index; an OR of the two read every row twice).
        branches: list[list[tuple[str, list[Any]]] | None] = [None]
        if f.key_arns and not f.alias_arn and not f.key_sent:
            branches = [*self._key_branches(f.key_arns)]
        groups: dict[tuple[Any, Any], dict[str, Any]] = {}
        with self.db.transaction(commit=False) as c:
            for parts in branches:
                where, params = self._where(f, parts)
                sql = (
                    f"SELECT {column} AS grp, {period} AS period, COUNT(*) AS n, "
                    f"MIN(u.seq) AS first_seq, MAX(u.seq) AS last_seq FROM {self.usage} u"
                    f"{where} GROUP BY {column}" + (f", {period}" if bucket is not None else "")
                )
                for found in c.execute(sql, params).fetchall():
                    g = groups.get((found["grp"], found["period"]))
                    if g is None:
                        groups[(found["grp"], found["period"])] = dict(found)
                        continue
                    g["n"] += found["n"]
                    g["first_seq"] = min(g["first_seq"], found["first_seq"])
                    g["last_seq"] = max(g["last_seq"], found["last_seq"])
            rows = list(groups.values())
            seqs = {r["first_seq"] for r in rows} | {r["last_seq"] for r in rows}
            times = self._times(c, seqs)
            if by in ("key", "principal"):
                names = self._names_of(c, (r["grp"] for r in rows))
                for r in rows:
                    r["grp"] = names[r["grp"]]
        for r in rows:
            r["first"] = times[r.pop("first_seq")]
            r["last"] = times[r.pop("last_seq")]
            if bucket is None:
                del r["period"]
            else:
                r["period"] = period_text(bucket, int(r["period"]))
        rows.sort(key=lambda r: (-r["n"], str(r["grp"]), r.get("period", "")))
        return rows[:top] if top is not None else rows

    def _times(self, c: SqlCursor, seqs: Iterable[int]) -> dict[int, str]:
        select = f"SELECT seq, time FROM {self.usage} WHERE"
        return {int(q): t for q, t in self._select_in(c, select, "seq", sorted(seqs))}

    def last_used(self, key_arn: str, *, workers: int | None = None) -> dict[str, Any] | None:
        """The last successful cryptographic call with the key (GetKeyLastUsage), as
        a row, or None. ``workers`` goes to ``catch_up`` (0 in a threaded server)."""
        self.catch_up(workers=workers)
        ops = sorted(CRYPTO_OPERATIONS)
        marks = ", ".join("?" for _ in ops)
        found: list[dict[str, Any]] = []
        with self.db.transaction(commit=False) as c:
            for column in (self._is_named("u.key_no"), "u.source_key_arn = ?"):
                row = c.execute(
                    f"SELECT {_ROW} FROM {self.usage} u WHERE {column} AND u.error_code IS NULL "
                    f"AND u.operation IN ({marks}) ORDER BY u.seq DESC LIMIT 1",
                    [key_arn, *ops],
                ).fetchone()
                if row is not None:
                    found.append(dict(row))
        return max(found, key=lambda r: int(r["seq"])) if found else None

    def denied_bursts(
        self, f: Filters, *, window_s: int = 300, threshold: int = 5
    ) -> list[dict[str, Any]]:
        """AccessDenied bursts: per (principal, source IP), runs of denials in which
        each is at most ``window_s`` after the previous, with at least ``threshold``;
        largest first. The denials are read per principal in seq order from one
        covering index (four narrow columns each) and split into runs here."""
        denied = Filters(**{**f.__dict__, "error_code": "AccessDeniedException", "limit": None})
        self.catch_up()
        where, params = self._where(denied)
        window_us = window_s * 1_000_000
        sql = (
            f"SELECT u.principal_no, u.source_ip, u.seq, u.ts FROM {self.usage} u{where} "
            "ORDER BY u.error_code, u.principal_no, u.seq"
        )
        with self.db.transaction(commit=False) as c:
            found = c.select_values(sql, params)
            principals = self._names_of(c, (row[0] for row in found))
            # Per (principal, source IP), in seq order: the index gives principal, seq.
            by_source: dict[tuple[Any, Any], list[tuple[Any, ...]]] = {}
            for row in found:
                by_source.setdefault((row[0], row[1]), []).append(row)
            runs: list[tuple[tuple[Any, ...], tuple[Any, ...], int]] = []  # first, last, n
            for rows in by_source.values():
                start, prev = 0, rows[0][3]
                for i, row in enumerate(rows):
                    if row[3] - prev > window_us:  # a gap: the run before it ends
                        if i - start >= threshold:
                            runs.append((rows[start], rows[i - 1], i - start))
                        start = i
                    prev = row[3]
                if len(rows) - start >= threshold:
                    runs.append((rows[start], rows[-1], len(rows) - start))
            times = self._times(c, {int(r[2]) for a, b, _ in runs for r in (a, b)})
        out = [
            {
                "principal": principals[a[0]],
                "source_ip": a[1],
                "count": n,
                "first": times[int(a[2])],
                "last": times[int(b[2])],
                "first_seq": int(a[2]),
                "last_seq": int(b[2]),
            }
            for a, b, n in runs
        ]
        out.sort(key=lambda b: (-b["count"], b["first_seq"]))
        return out


def group_bursts(
    rows: Sequence[dict[str, Any]], *, window_s: int, threshold: int
) -> list[dict[str, Any]]:
    """Runs of denials per (principal, source IP), rows given in that order, then seq."""
    out: list[dict[str, Any]] = []
    run: list[dict[str, Any]] = []

    def close() -> None:
        if len(run) >= threshold:
            out.append(
                {
                    "principal": run[0]["principal"],
                    "source_ip": run[0]["source_ip"],
                    "count": len(run),
                    "first": run[0]["time"],
                    "last": run[-1]["time"],
                    "first_seq": run[0]["seq"],
                    "last_seq": run[-1]["seq"],
                }
            )

    for r in rows:
        same = run and (run[-1]["principal"], run[-1]["source_ip"]) == (
            r["principal"],
            r["source_ip"],
        )
        if same and int(r["ts"]) - int(run[-1]["ts"]) <= window_s * 1_000_000:
            run.append(r)
            continue
        close()
        run = [r]
    close()
    out.sort(key=lambda b: (-b["count"], b["first_seq"]))
    return out


def stored_records(db: LedgerDatabase, seqs: Sequence[int]) -> list[LedgerRecord]:
    """The chained records at ``seqs`` (in seq order), read in chunks."""
    out: list[LedgerRecord] = []
    wanted = sorted(set(seqs))
    with db.transaction(commit=False) as c:
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            rows = c.execute(
                "SELECT c.seq AS seq, c.record_hash AS record_hash, c.prev AS prev, "
                "e.state AS state FROM {chain} c JOIN {events} e "
                "ON e.{nid} = c.notification_id WHERE c.seq IN ("
                + ", ".join("?" for _ in chunk)
                + ") ORDER BY c.seq",
                chunk,
            ).fetchall()
            out.extend(
                LedgerRecord(
                    seq=int(r["seq"]),
                    data=bytes(r["state"]),
                    record_hash=bytes(r["record_hash"]),
                    prev=bytes(r["prev"]),
                )
                for r in rows
            )
    return out
