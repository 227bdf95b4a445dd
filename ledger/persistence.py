"""Persistence wiring: canonical event bytes, the in-transaction hash chain, and SQL
access for followers (SQLite by default, PostgreSQL when a database URL is given).

Every stored event's ``state`` is its canonical record (RFC 8785 JSON with the
originator id, version and topic inside), and the chain row for it is written in the
same transaction that stores it: ``kl_chain(seq, notification_id, record_hash, prev)``
with ``seq`` 1-based and contiguous and ``prev`` the previous record's hash.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlparse
from uuid import UUID

from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor
from eventsourcing.utils import get_topic, resolve_topic

from ledger import appendlog
from ledger.appendlog import AppendIndexer
from ledger.domain.model import ApiCall
from ledger.records import GENESIS, LedgerRecord, canonical

CHAIN_TABLE = "kl_chain"
POSITIONS_TABLE = "kl_positions"
DDL_LOCK_ID = 0x6B6C6464  # "kldd": serialises schema creation across processes


class _UnusedTranscoder(Transcoder):
    def encode(self, obj: Any) -> bytes:  # pragma: no cover - never called
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:  # pragma: no cover - never called
        raise NotImplementedError


class CanonicalMapper(Mapper[UUID]):
    """Maps domain events to canonical JSON records and back.

    Events may only hold plain JSON values (plus the datetime ``timestamp`` and UUID
    ``originator_id``); anything else raises TypeError at save time.
    """

    def __init__(self) -> None:
        super().__init__(transcoder=_UnusedTranscoder())

    def to_stored_event(self, domain_event: DomainEventProtocol[UUID]) -> StoredEvent:
        state = dict(vars(domain_event))
        originator_id = state["originator_id"]
        version = state["originator_version"]
        topic = get_topic(type(domain_event))
        state["originator_id"] = str(originator_id)
        state["timestamp"] = cast(datetime, state["timestamp"]).isoformat()
        state["topic"] = topic
        class_version = getattr(type(domain_event), "class_version", 1)
        if class_version > 1:
            state["class_version"] = class_version
        return StoredEvent(
            originator_id=originator_id,
            originator_version=version,
            topic=topic,
            state=canonical(state),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[UUID]:
        import orjson

        cls = resolve_topic(stored_event.topic)
        state: dict[str, Any] = orjson.loads(stored_event.state)
        state.pop("topic", None)
        state["originator_id"] = UUID(str(stored_event.originator_id))
        state["originator_version"] = stored_event.originator_version
        state["timestamp"] = datetime.fromisoformat(state["timestamp"])
        class_version = getattr(cls, "class_version", 1)
        from_version = state.pop("class_version", 1)
        while from_version < class_version:
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(state)
            from_version += 1
        event = object.__new__(cls)
        object.__setattr__(event, "__dict__", state)
        return cast(DomainEventProtocol[UUID], event)


# Topics of recorded calls (ApiCall.Succeeded / Failed): write-once streams that change
# no aggregate anyone caches; every other event does (see ``changes_state``).
_CALL_TOPIC_PREFIX = get_topic(ApiCall) + "."


def changes_state(events: Sequence[StoredEvent]) -> bool:
    """True when ``events`` hold anything but recorded calls: their transaction must
    bump the state version (``appendlog.bump_state_version``)."""
    return any(not ev.topic.startswith(_CALL_TOPIC_PREFIX) for ev in events)


def chain_rows(
    head_seq: int, head_hash: bytes, ids: Sequence[int], events: Sequence[StoredEvent]
) -> list[tuple[int, int, bytes, bytes]]:
    """Chain rows ``(seq, notification_id, record_hash, prev)`` for new events."""
    rows = []
    seq, prev = head_seq, head_hash
    for nid, ev in zip(ids, events, strict=True):
        digest = hashlib.sha256(ev.state).digest()
        seq += 1
        rows.append((seq, nid, digest, prev))
        prev = digest
    return rows


class ChainedSQLiteRecorder(SQLiteApplicationRecorder):
    """SQLite application recorder that extends the hash chain in the same transaction."""

    def construct_create_table_statements(self) -> list[str]:
        statements = super().construct_create_table_statements()
        statements.append(
            f"CREATE TABLE IF NOT EXISTS {CHAIN_TABLE} ("
            "seq INTEGER PRIMARY KEY, notification_id INTEGER NOT NULL UNIQUE, "
            "record_hash BLOB NOT NULL, prev BLOB NOT NULL)"
        )
        statements.append(
            f"CREATE TABLE IF NOT EXISTS {POSITIONS_TABLE} ("
            "name TEXT PRIMARY KEY, position INTEGER NOT NULL)"
        )
        statements.extend(appendlog.create_statements("BLOB", "INTEGER"))
        return statements

    @property
    def indexer(self) -> AppendIndexer:
        """The per-key chain and Merkle tree extender of this recorder."""
        found: AppendIndexer | None = self.__dict__.get("_kl_indexer")
        if found is None:
            found = self.__dict__.setdefault("_kl_indexer", AppendIndexer())
        return found

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids = super()._insert_events(c, stored_events, **kwargs)
        assert ids is not None
        c.execute(f"SELECT seq, record_hash FROM {CHAIN_TABLE} ORDER BY seq DESC LIMIT 1")
        row = c.fetchone()
        head_seq, head_hash = (row[0], bytes(row[1])) if row else (0, GENESIS)
        rows = chain_rows(head_seq, head_hash, ids, stored_events)
        c.executemany(f"INSERT INTO {CHAIN_TABLE} VALUES (?,?,?,?)", rows)
        sql = _SqliteSql(c, self.events_table_name)
        self.indexer.extend(sql, head_seq, head_hash, rows, [ev.state for ev in stored_events])
        if changes_state(stored_events):
            appendlog.bump_state_version(sql)
        return ids


def _table_names(events: str, prefix: str, nid: str) -> dict[str, str]:
    return {
        "events": events,
        "nid": nid,
        "chain": prefix + CHAIN_TABLE,
        "positions": prefix + POSITIONS_TABLE,
        "tree": prefix + appendlog.TREE_TABLE,
        "tree_head": prefix + appendlog.TREE_HEAD_TABLE,
        "key_chain": prefix + appendlog.KEY_CHAIN_TABLE,
        "key_heads": prefix + appendlog.KEY_HEADS_TABLE,
        "checkpoints": prefix + appendlog.CHECKPOINTS_TABLE,
        "signing_keys": prefix + appendlog.SIGNING_KEYS_TABLE,
        "state": prefix + appendlog.STATE_TABLE,
    }


class _SqliteSql:
    """``appendlog.Sql`` over the storing transaction's SQLite cursor."""

    def __init__(self, cursor: Any, events_table: str) -> None:
        self._c = cursor
        self._names = _table_names(events_table, "", "rowid")

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._c.execute(sql.format(**self._names), tuple(params))
        return [tuple(r) for r in self._c.fetchall()]

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._c.executemany(sql.format(**self._names), [tuple(r) for r in rows])


def sqlite_env(path: Path) -> dict[str, str]:
    return {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": str(path),
        "SQLITE_LOCK_TIMEOUT": "30",
        "APPLICATION_RECORDER_TOPIC": get_topic(ChainedSQLiteRecorder),
    }


def postgres_env(url: str, pool_size: int = 10) -> dict[str, str]:
    """eventsourcing settings from ``postgresql://user:pw@host:port/db?schema=s``.

    Raises ValueError for a URL that is not a PostgreSQL URL.
    """
    u = urlparse(url)
    if u.scheme not in ("postgres", "postgresql"):
        raise ValueError("KEYLEDGER_DATABASE_URL must start with postgresql://")
    query = parse_qs(u.query)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(u.path.lstrip("/")) or "postgres",
        "POSTGRES_HOST": u.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(u.port or 5432),
        "POSTGRES_USER": unquote(u.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(u.password or ""),
        "POSTGRES_SCHEMA": query.get("schema", ["public"])[0],
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": "10",
        "POSTGRES_LOCK_TIMEOUT": "30",
        "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
        "APPLICATION_RECORDER_TOPIC": "ledger.persistence_postgres:ChainedPostgresRecorder",
    }


def ensure_postgres_schema(url: str) -> None:
    """Create the schema named in the URL if missing (the recorder does not)."""
    import psycopg
    from psycopg.sql import SQL, Identifier

    env = postgres_env(url)
    with psycopg.connect(
        dbname=env["POSTGRES_DBNAME"],
        host=env["POSTGRES_HOST"],
        port=int(env["POSTGRES_PORT"]),
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
        autocommit=True,
        connect_timeout=5,
    ) as conn:
        conn.execute(
            SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(env["POSTGRES_SCHEMA"]))
        )


class Row(Mapping[str, Any]):
    """A result row readable by column name on both backends (bytes, not memoryview)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._d = {k: bytes(v) if isinstance(v, memoryview) else v for k, v in data.items()}

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


#: What PostgreSQL stores for NUL, which its text type cannot hold.
PG_NUL = "\ufffd"


def pg_text_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with NUL in each text value replaced by ``PG_NUL``."""
    if not any(type(v) is str and "\x00" in v for v in row):
        return row
    return tuple(v.replace("\x00", PG_NUL) if type(v) is str else v for v in row)


class CopyData(bytes):
    """Rows already in one of PostgreSQL's COPY formats (``copy_rows``), for
    ``SqlCursor.insert_new``: a worker process formats them, the writer streams them."""

    binary = False


class CopyBinary(CopyData):
    """A whole COPY BINARY stream (signature, rows, trailer)."""

    binary = True


class SQLiteBatch(bytes):
    """Rows in a serialized in-memory SQLite database (``sqlite_batch``): a worker
    process builds it, the writer attaches it (``LedgerDatabase.transaction_with``) and
    inserts its rows in one INSERT ... SELECT, in C. ``executemany`` in the writer bound
    each value from Python: 3.4 against 1.4 us a row of the usage index."""


#: The schema name a ``SQLiteBatch`` is attached under.
BATCH_SCHEMA = "kl_batch"


def sqlite_batch(tables: Sequence[tuple[str, str, Sequence[Sequence[Any]]]]) -> SQLiteBatch | None:
    """A ``SQLiteBatch`` of ``(table name, column definitions, rows)``: each table
    created with those definitions (the destination's, so values get the same types)
    and its rows inserted in order. None where this Python's sqlite3 cannot serialize a
    database. Names and definitions are trusted, never user input; raises sqlite3's
    error for a row that does not fit its table."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        if not hasattr(conn, "serialize"):  # pragma: no cover - Python < 3.11
            return None
        conn.execute("BEGIN")
        for name, columns, rows in tables:
            conn.execute(f"CREATE TABLE {name} ({columns})")
            if rows:
                marks = ", ".join("?" for _ in rows[0])
                conn.executemany(f"INSERT INTO {name} VALUES ({marks})", rows)
        conn.execute("COMMIT")
        return SQLiteBatch(conn.serialize())
    finally:
        conn.close()


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # no flags, no header extension
_COPY_TRAILER = b"\xff\xff"


def copy_rows(rows: Sequence[Sequence[Any]], types: Sequence[str]) -> CopyData | None:
    """``rows`` formatted for COPY by psycopg, as ``Copy.write_row`` does (in C):
    binary when every value fits its column's type (``types``: PostgreSQL type names,
    say ``int8`` and ``text``; the server parses binary rows in three quarters of the
    time), else text. None where psycopg's formatter is not there. Text values must
    not hold NUL (``pg_text_row`` first). Raises psycopg's error for a value it cannot
    adapt at all."""
    try:
        from psycopg import adapters, pq
        from psycopg._copy_base import format_row_binary, format_row_text
        from psycopg.adapt import Transformer
    except ImportError:  # pragma: no cover - psycopg missing, or its internals moved
        return None
    tx = Transformer()
    tx.set_dumper_types([adapters.types[t].oid for t in types], pq.Format.BINARY)
    out = bytearray(_COPY_SIGNATURE)
    try:
        for row in rows:
            format_row_binary(row, tx, out)
    except Exception:  # a value of another type (an int in a text column): as text
        out = bytearray()
        text = Transformer()
        for row in rows:
            format_row_text(row, text, out)
        return CopyData(out)
    out += _COPY_TRAILER
    return CopyBinary(out)


class SqlCursor:
    """A cursor that takes ``?`` placeholders and ``{events}``/``{chain}``/``{positions}``
    table names on either backend."""

    def __init__(self, raw: Any, db: LedgerDatabase) -> None:
        self._raw = raw
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> SqlCursor:
        """Run ``sql``. On PostgreSQL a NUL in a text parameter is sent as U+FFFD (its
        text type cannot hold NUL), so writes and lookups of such values agree."""
        args = tuple(params)
        if self._db.is_postgres:
            args = pg_text_row(args)
        self._raw.execute(self._db.sql(sql), args)
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run ``sql`` once per row (NUL in text as for ``execute``)."""
        if self._db.is_postgres:
            self._raw.executemany(self._db.sql(sql), [pg_text_row(tuple(r)) for r in rows])
            return
        self._raw.executemany(self._db.sql(sql), [tuple(r) for r in rows])

    def insert_new(
        self,
        table: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]] | CopyData | SQLiteBatch,
        *,
        after_seq: int | None = None,
    ) -> None:
        """INSERT the ``rows`` whose ``seq`` column is after ``after_seq``; with None,
        the caller knows none of them is in ``table`` yet. Rows whose key is already
        there are skipped either way (for tables that have a unique key at the time).

        On PostgreSQL the rows are streamed with COPY (row-by-row INSERTs cost ten times
        more): straight into ``table`` when none is there yet, otherwise into a
        temporary table and inserted from it in one statement. On SQLite they are
        inserted with ``executemany``. ``table`` and ``columns`` are trusted names, never
        user input. Raises the driver's error on failure (a key already there, with
        ``after_seq`` None, on PostgreSQL; text holding NUL, on PostgreSQL, whose
        text cannot hold it: map it first with ``pg_text_row``). ``rows`` as
        ``CopyData`` (PostgreSQL only) are streamed as they are; on SQLite they raise
        TypeError. ``rows`` as a ``SQLiteBatch`` (SQLite only; TypeError on PostgreSQL)
        are its table of ``table``'s name, which the caller has attached
        (``LedgerDatabase.transaction_with``): inserted with one INSERT ... SELECT.
        """
        cols = ", ".join(columns)
        if isinstance(rows, SQLiteBatch):
            if self._db.is_postgres:
                raise TypeError("a SQLite batch is for SQLite")
            where = "true" if after_seq is None else f"seq > {int(after_seq)}"
            self.execute(
                f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {BATCH_SCHEMA}.{table} "
                f"WHERE {where} ON CONFLICT DO NOTHING"  # WHERE: else ON reads as a join's
            )
            return
        if not self._db.is_postgres:
            if isinstance(rows, CopyData):
                raise TypeError("COPY rows are for PostgreSQL")
            marks = ", ".join("?" for _ in columns)
            if after_seq is not None:
                at = list(columns).index("seq")
                rows = [r for r in rows if r[at] > after_seq]
            self.executemany(
                f"INSERT INTO {table} ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING", rows
            )
            return
        if not rows:
            return
        raw = self._raw

        def copy_into(target: str) -> None:
            binary = " (FORMAT BINARY)" if isinstance(rows, CopyData) and rows.binary else ""
            with raw.copy(f"COPY {target} ({cols}) FROM STDIN{binary}") as copy:
                if isinstance(rows, CopyData):
                    copy.write(rows)
                else:
                    write = copy.write_row  # psycopg formats each row in C
                    for row in rows:
                        write(row)

        if after_seq is None:
            copy_into(table)
            return
        staging = "kl_staging_" + table.rsplit(".", 1)[-1].strip('"')
        raw.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {table}) ON COMMIT DELETE ROWS"
        )
        copy_into(staging)
        raw.execute(
            f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {staging} "
            f"WHERE seq > {int(after_seq)} "
            "ON CONFLICT DO NOTHING"
        )
        raw.execute(f"TRUNCATE {staging}")

    def fetchall(self) -> list[Row]:
        return [Row(self._as_dict(r)) for r in self._raw.fetchall()]

    def select_values(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query and return its rows as plain tuples, straight from the driver:
        for bulk reads, where per-row mappings cost more than the query."""
        raw = getattr(self._raw, "sqlite_cursor", self._raw)  # SQLite: under the wrapper
        if self._db.is_postgres:
            from psycopg.rows import tuple_row

            plain: Any = tuple_row
        else:
            plain = None
        factory = raw.row_factory
        raw.row_factory = plain
        try:
            self.execute(sql, params)
            return list(raw.fetchall())
        finally:
            raw.row_factory = factory

    def fetchone(self) -> Row | None:
        r = self._raw.fetchone()
        return None if r is None else Row(self._as_dict(r))

    def _as_dict(self, r: Any) -> dict[str, Any]:
        if isinstance(r, dict):
            return r
        return {k: r[k] for k in r.keys()}  # noqa: SIM118 - sqlite3.Row


class LedgerDatabase:
    """SQL access to the ledger's tables for verification, followers and projections.

    Implements ``LedgerReader`` and ``PositionStore``.
    """

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder
        self.datastore = recorder.datastore
        self.is_postgres = not isinstance(recorder, SQLiteApplicationRecorder)
        if self.is_postgres:
            schema = '"' + self.datastore.schema.replace('"', '""') + '"'
            self._names = {
                **_table_names(
                    f'{schema}."{recorder.events_table_name}"', schema + ".", "notification_id"
                ),
                "schema": schema,
                "blob": "bytea",
            }
        else:
            self._names = {
                **_table_names(recorder.events_table_name, "", "rowid"),
                "schema": "main",
                "blob": "BLOB",
            }

    def table(self, name: str) -> str:
        """A qualified table name for a table of ours (created in the ledger's schema)."""
        if self.is_postgres:
            return f"{self._names['schema']}.{name}"
        return name

    def sql(self, statement: str) -> str:
        text = statement.format(**self._names)
        return text.replace("?", "%s") if self.is_postgres else text

    @contextmanager
    def transaction(self, *, commit: bool) -> Iterator[SqlCursor]:
        with self.datastore.transaction(commit=commit) as raw:
            yield SqlCursor(raw, self)

    @contextmanager
    def transaction_with(self, batch: SQLiteBatch | None) -> Iterator[SqlCursor]:
        """A committing transaction; on SQLite with ``batch`` (if any) attached as
        schema ``BATCH_SCHEMA`` for its duration, detached afterwards (ATTACH cannot
        run inside a transaction, so this takes its own connection from the pool).
        Raises TypeError for a batch on PostgreSQL; sqlite3's error for one that is
        no database."""
        if batch is None:
            with self.transaction(commit=True) as c:
                yield c
            return
        if self.is_postgres:
            raise TypeError("a SQLite batch is for SQLite")
        with self.datastore.get_connection(commit=True) as conn:
            raw = conn.cursor().sqlite_cursor.connection
            raw.execute(f"ATTACH ':memory:' AS {BATCH_SCHEMA}")
            try:
                raw.deserialize(batch, name=BATCH_SCHEMA)
                with conn.transaction(commit=True) as cursor:
                    yield SqlCursor(cursor, self)
            finally:
                if raw.in_transaction:  # a commit that failed: DETACH needs none open
                    raw.rollback()
                raw.execute(f"DETACH {BATCH_SCHEMA}")

    @contextmanager
    def ddl_transaction(self) -> Iterator[SqlCursor]:
        """A committing transaction for schema changes, serialised across processes."""
        with self.transaction(commit=True) as c:
            if self.is_postgres:
                c.execute("SELECT pg_advisory_xact_lock(?)", (DDL_LOCK_ID,))
            yield c

    # LedgerReader
    def read_records(self, after_seq: int, limit: int) -> list[LedgerRecord]:
        with self.transaction(commit=False) as c:
            rows = c.execute(
                "SELECT c.seq AS seq, c.record_hash AS record_hash, c.prev AS prev, "
                "e.state AS state FROM {chain} c JOIN {events} e ON e.{nid} = c.notification_id "
                # Seqs are contiguous; the upper bound keeps PostgreSQL's plan a short
                # index range (for "seq > N" alone it chose parallel scans, 10+ ms).
                "WHERE c.seq > ? AND c.seq <= ? ORDER BY c.seq LIMIT ?",
                (after_seq, after_seq + limit, limit),
            ).fetchall()
        return [
            LedgerRecord(
                seq=r["seq"], data=bytes(r["state"]), record_hash=r["record_hash"], prev=r["prev"]
            )
            for r in rows
        ]

    def head(self) -> tuple[int, bytes]:
        """``(seq, record_hash)`` of the last chained record, ``(0, GENESIS)`` if empty."""
        with self.transaction(commit=False) as c:
            row = c.execute(
                "SELECT seq, record_hash FROM {chain} ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return (0, GENESIS) if row is None else (int(row["seq"]), row["record_hash"])

    def state_version(self) -> int:
        """How many committed transactions changed aggregate state (0 on a ledger that
        has had none since the counter was added); see ``appendlog.STATE_TABLE``."""
        with self.transaction(commit=False) as c:
            got = c.select_values("SELECT n FROM {state} WHERE id = 1")
        return int(got[0][0]) if got else 0

    def head_seq(self) -> int:
        return self.head()[0]

    # PositionStore
    def get_position(self, name: str) -> int:
        with self.transaction(commit=False) as c:
            row = c.execute("SELECT position FROM {positions} WHERE name = ?", (name,)).fetchone()
        return 0 if row is None else int(row["position"])

    def set_position(self, name: str, position: int) -> None:
        with self.transaction(commit=True) as c:
            self.save_position(c, name, position)

    def save_position(self, c: SqlCursor, name: str, position: int) -> None:
        """Save a follower position inside a caller's transaction."""
        c.execute(
            "INSERT INTO {positions} (name, position) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
            (name, position),
        )

    # Verification reads
    def _pages(self, sql: str, after: int, upto: int | None, page: int) -> Iterator[Row]:
        """Rows of ``sql`` (``... WHERE <seq> > ? AND <seq> <= ? ... LIMIT ?``, ordered by
        a ``seq`` column) page by page, each page in its own read transaction."""
        last = after
        bound = upto if upto is not None else 2**62
        while last < bound:
            with self.transaction(commit=False) as c:
                rows = c.execute(sql, (last, bound, page)).fetchall()
            if not rows:
                return
            yield from rows
            last = int(rows[-1]["seq"])

    def iter_chain(self, page: int = 5000) -> Iterator[Row]:
        return self._pages(
            "SELECT seq, notification_id, record_hash, prev FROM {chain} "
            "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            0,
            None,
            page,
        )

    def iter_chain_states(self, page: int = 5000) -> Iterator[bytes]:
        """The stored bytes of every chained record, in seq order."""
        for r in self._pages(
            "SELECT c.seq AS seq, e.state AS state FROM {chain} c "
            "JOIN {events} e ON e.{nid} = c.notification_id "
            "WHERE c.seq > ? AND c.seq <= ? ORDER BY c.seq LIMIT ?",
            0,
            None,
            page,
        ):
            yield bytes(r["state"])

    def iter_records_with_keys(
        self, first: int, last: int, page: int = 5000
    ) -> Iterator[tuple[int, bytes, bytes, bytes, str | None, int | None, bytes | None]]:
        """``(seq, data, record_hash, prev, key_arn, key_seq, key_prev)`` for records
        ``first..last``, in order."""
        for r in self._pages(
            "SELECT c.seq AS seq, e.state AS state, c.record_hash AS record_hash, "
            "c.prev AS prev, k.key_arn AS key_arn, k.key_seq AS key_seq, "
            "k.key_prev AS key_prev FROM {chain} c "
            "JOIN {events} e ON e.{nid} = c.notification_id "
            "LEFT JOIN {key_chain} k ON k.seq = c.seq "
            "WHERE c.seq > ? AND c.seq <= ? ORDER BY c.seq LIMIT ?",
            first - 1,
            last,
            page,
        ):
            key_seq = r["key_seq"]
            yield (
                int(r["seq"]),
                bytes(r["state"]),
                bytes(r["record_hash"]),
                bytes(r["prev"]),
                r["key_arn"],
                None if key_seq is None else int(key_seq),
                None if r["key_prev"] is None else bytes(r["key_prev"]),
            )

    def iter_events(self, page: int = 5000) -> Iterator[Row]:
        last = -1
        while True:
            with self.transaction(commit=False) as c:
                rows = c.execute(
                    "SELECT {nid} AS nid, originator_id, originator_version, topic, state "
                    "FROM {events} WHERE {nid} > ? ORDER BY {nid} LIMIT ?",
                    (last, page),
                ).fetchall()
            if not rows:
                return
            yield from rows
            last = int(rows[-1]["nid"])


__all__ = [
    "CHAIN_TABLE",
    "POSITIONS_TABLE",
    "CanonicalMapper",
    "ChainedSQLiteRecorder",
    "LedgerDatabase",
    "ensure_postgres_schema",
    "postgres_env",
    "sqlite_env",
]
