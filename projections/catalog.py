"""The key catalog: the current metadata of every key, built from the log.

The catalog and its position are written in one transaction, so a crash never leaves
them apart; updates only move forward (``updated_seq``), so concurrent catch-ups in
several processes converge. ListKeys and DescribeKey read it after catching up.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson

from ledger.errors import NotFoundError, ValidationError
from ledger.persistence import LedgerDatabase, SqlCursor
from ledger.records import LedgerRecord

TOPIC_PREFIX = "ledger.domain.model:"
CATALOG = "kl_key_catalog"
POSITION_NAME = "projection:key_catalog"


class KeyCatalog:
    """Key catalog projection over a ledger database."""

    def __init__(self, db: LedgerDatabase, *, batch_size: int = 1000) -> None:
        self.db = db
        self.table = db.table(CATALOG)
        self.batch_size = batch_size
        self._lock = threading.Lock()
        with db.ddl_transaction() as c:
            c.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} (key_id TEXT PRIMARY KEY, "
                "arn TEXT NOT NULL, metadata TEXT NOT NULL, updated_seq BIGINT NOT NULL)"
            )

    @property
    def position(self) -> int:
        return self.db.get_position(POSITION_NAME)

    def catch_up(self) -> int:
        """Apply every record after the tracked position; return how many were read."""
        done = 0
        with self._lock:
            while True:
                position = self.db.get_position(POSITION_NAME)
                records = self.db.read_records(position, self.batch_size)
                if not records:
                    return done
                with self.db.transaction(commit=True) as c:
                    for record in records:
                        self._apply(c, record)
                    c.execute(
                        "INSERT INTO {positions} (name, position) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET position = excluded.position "
                        "WHERE {positions}.position < excluded.position",
                        (POSITION_NAME, records[-1].seq),
                    )
                done += len(records)

    def rebuild(self) -> int:
        """Drop the catalog and rebuild it from the whole log; return records read."""
        with self._lock, self.db.transaction(commit=True) as c:
            c.execute(f"DELETE FROM {self.table}")
            c.execute("DELETE FROM {positions} WHERE name = ?", (POSITION_NAME,))
        return self.catch_up()

    def _apply(self, c: SqlCursor, record: LedgerRecord) -> None:
        event = record.event()
        topic = str(event.get("topic", ""))
        if not topic.startswith(TOPIC_PREFIX + "Key."):
            return
        kind = topic[len(TOPIC_PREFIX) + 4 :]
        key_id = str(event["originator_id"])
        if kind == "Created":
            meta = {
                "AWSAccountId": event["call"]["account_id"],
                "KeyId": key_id,
                "Arn": event["key_arn"],
                "CreationDate": event["timestamp"],
                "Enabled": True,
                "Description": event["description"],
                "KeyUsage": event["key_usage"],
                "KeyState": "Enabled",
                "Origin": event["origin"],
                "KeyManager": "CUSTOMER",
                "CustomerMasterKeySpec": event["key_spec"],
                "KeySpec": event["key_spec"],
                "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
                "MultiRegion": False,
            }
        else:
            row = c.execute(
                f"SELECT metadata FROM {self.table} WHERE key_id = ?", (key_id,)
            ).fetchone()
            if row is None:
                return
            meta = orjson.loads(row["metadata"])
            if kind == "Enabled":
                meta.update(Enabled=True, KeyState="Enabled")
            elif kind == "Disabled":
                meta.update(Enabled=False, KeyState="Disabled")
            else:
                return
        c.execute(
            f"INSERT INTO {self.table} (key_id, arn, metadata, updated_seq) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key_id) DO UPDATE SET metadata = excluded.metadata, "
            "updated_seq = excluded.updated_seq "
            f"WHERE {self.table}.updated_seq < excluded.updated_seq",
            (
                key_id,
                meta["Arn"],
                orjson.dumps(meta, option=orjson.OPT_SORT_KEYS).decode(),
                record.seq,
            ),
        )

    @staticmethod
    def _public(meta: dict[str, Any]) -> dict[str, Any]:
        out = dict(meta)
        out["CreationDate"] = datetime.fromisoformat(meta["CreationDate"]).timestamp()
        return out

    def describe_key(self, key_uuid: UUID, arn_for_errors: str) -> dict[str, Any]:
        """DescribeKey's response; raises NotFoundError for an unknown key."""
        self.catch_up()
        with self.db.transaction(commit=False) as c:
            row = c.execute(
                f"SELECT metadata FROM {self.table} WHERE key_id = ?", (str(key_uuid),)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"Key '{arn_for_errors}' does not exist")
        return {"KeyMetadata": self._public(orjson.loads(row["metadata"]))}

    def list_keys(self, *, limit: int = 100, marker: str | None = None) -> dict[str, Any]:
        """ListKeys' response, ordered by key id, paginated with an opaque marker.

        Raises ValidationError for a limit outside 1-1000.
        """
        if not 1 <= limit <= 1000:
            raise ValidationError(
                f"1 validation error detected: Value '{limit}' at 'limit' failed to satisfy "
                "constraint: Member must have value between 1 and 1000"
            )
        self.catch_up()
        with self.db.transaction(commit=False) as c:
            rows = c.execute(
                f"SELECT key_id, arn FROM {self.table} WHERE key_id > ? ORDER BY key_id LIMIT ?",
                (marker or "", limit + 1),
            ).fetchall()
        keys = [{"KeyId": r["key_id"], "KeyArn": r["arn"]} for r in rows[:limit]]
        out: dict[str, Any] = {"Keys": keys, "Truncated": len(rows) > limit}
        if len(rows) > limit:
            out["NextMarker"] = keys[-1]["KeyId"]
        return out

    def snapshot(self) -> list[tuple[str, str]]:
        """Every catalog row (key id, metadata JSON), for comparing rebuilds."""
        with self.db.transaction(commit=False) as c:
            rows = c.execute(
                f"SELECT key_id, metadata FROM {self.table} ORDER BY key_id"
            ).fetchall()
        return [(r["key_id"], r["metadata"]) for r in rows]
