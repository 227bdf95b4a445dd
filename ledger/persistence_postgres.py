"""The PostgreSQL recorder that extends the chain, per-key chain and tree after the table
lock. Imported only for PostgreSQL URLs (through eventsourcing's recorder topic), so the
embedded SQLite default never loads psycopg."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from ledger import appendlog
from ledger.appendlog import AppendIndexer
from ledger.persistence import (
    CHAIN_TABLE,
    DDL_LOCK_ID,
    POSITIONS_TABLE,
    _table_names,
    chain_rows,
    changes_state,
)
from ledger.records import GENESIS


class ChainedPostgresRecorder(PostgresApplicationRecorder):
    """PostgreSQL recorder that extends the hash chain after the table lock.

    Requires POSTGRES_ENABLE_DB_FUNCTIONS off: that path skips the lock and this hook.
    """

    def __init__(self, datastore: Any, *, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name=events_table_name)
        schema = Identifier(self.datastore.schema)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {}.{} (seq bigint PRIMARY KEY, "
                "notification_id bigint NOT NULL UNIQUE, record_hash bytea NOT NULL, "
                "prev bytea NOT NULL)"
            ).format(schema, Identifier(CHAIN_TABLE))
        )
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {}.{} (name text PRIMARY KEY, position bigint NOT NULL)"
            ).format(schema, Identifier(POSITIONS_TABLE))
        )
        prefix = '"' + self.datastore.schema.replace('"', '""') + '".'
        for ddl in appendlog.create_statements("bytea", "bigint", prefix):
            self.sql_create_statements.append(SQL(ddl))  # type: ignore[arg-type]
        self._pg_names = _table_names(
            prefix + '"' + self.events_table_name + '"', prefix, "notification_id"
        )
        self._select_head = SQL(
            "SELECT seq, record_hash FROM {}.{} ORDER BY seq DESC LIMIT 1"
        ).format(schema, Identifier(CHAIN_TABLE))
        self._insert_chain = SQL("INSERT INTO {}.{} VALUES (%s, %s, %s, %s)").format(
            schema, Identifier(CHAIN_TABLE)
        )

    def create_table(self) -> None:
        """Create tables, types and functions under an advisory lock, so processes
        starting at once do not race on DDL ("tuple concurrently updated")."""
        with self.datastore.get_connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (DDL_LOCK_ID,))
            try:
                super().create_table()
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (DDL_LOCK_ID,))

    def _fetch_ids_after_insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids = super()._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        assert ids is not None
        with curs.connection.cursor() as head:  # as _PostgresSql.rows: a cursor of its own
            head.execute(self._select_head)
            row = head.fetchone()
        head_seq, head_hash = (row["seq"], bytes(row["record_hash"])) if row else (0, GENESIS)
        rows = chain_rows(head_seq, head_hash, ids, stored_events)
        curs.executemany(self._insert_chain, rows)
        sql = _PostgresSql(curs, self._pg_names)
        self.indexer.extend(sql, head_seq, head_hash, rows, [ev.state for ev in stored_events])
        if changes_state(stored_events):
            appendlog.bump_state_version(sql)
        return ids

    @property
    def indexer(self) -> AppendIndexer:
        """The per-key chain and Merkle tree extender of this recorder."""
        found: AppendIndexer | None = self.__dict__.get("_kl_indexer")
        if found is None:
            found = self.__dict__.setdefault("_kl_indexer", AppendIndexer())
        return found


class _PostgresSql:
    """``appendlog.Sql`` over the storing transaction's psycopg cursor (dict rows)."""

    def __init__(self, cursor: Any, names: dict[str, str]) -> None:
        self._c = cursor
        self._names = names

    def _q(self, sql: str) -> Any:
        return SQL(sql.format(**self._names).replace("?", "%s"))

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        # A cursor of its own: in pipeline mode the storing cursor may still hold the
        # results of an executemany, and fetching there read "INSERT 0 1" (seen once in
        # tens of batches of 500 events).
        with self._c.connection.cursor() as c:
            c.execute(self._q(sql), tuple(params))
            got = c.fetchall()
        return [tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in got]

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._c.executemany(self._q(sql), [tuple(r) for r in rows])
