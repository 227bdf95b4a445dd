"""The key catalog: current documents of every key and alias, built from the log.

Documents and the position are written in one transaction, so a crash never leaves
them apart; updates only move forward (``updated_seq``), so concurrent catch-ups in
several processes converge. Read operations catch up first, then answer. The same
pure fold (``projections.state``) answers point-in-time questions from the log.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson

from ledger.errors import NotFoundError, ValidationError
from ledger.pagination import paginate
from ledger.persistence import LedgerDatabase, SqlCursor
from ledger.records import LedgerRecord
from projections.state import (
    LedgerState,
    alias_entry,
    apply_alias_event,
    apply_key_event,
    drop_alias,
    event_kind,
    grant_entries,
    key_metadata,
    key_policy,
)

KEYS = "kl_key_docs"
ALIASES = "kl_alias_docs"
POSITION_NAME = "projection:key_catalog:v2"


def _dumps(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()


class KeyCatalog:
    """Key and alias catalog projection over a ledger database."""

    def __init__(self, db: LedgerDatabase, *, batch_size: int = 1000) -> None:
        self.db = db
        self.keys_table = db.table(KEYS)
        self.aliases_table = db.table(ALIASES)
        self.batch_size = batch_size
        self._lock = threading.Lock()
        with db.ddl_transaction() as c:
            for table in (self.keys_table, self.aliases_table):
                c.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, "
                    "doc TEXT NOT NULL, updated_seq BIGINT NOT NULL)"
                )

    @property
    def position(self) -> int:
        return self.db.get_position(POSITION_NAME)

    # ---------------------------------------------------------------- building

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
            c.execute(f"DELETE FROM {self.keys_table}")
            c.execute(f"DELETE FROM {self.aliases_table}")
            c.execute("DELETE FROM {positions} WHERE name = ?", (POSITION_NAME,))
        return self.catch_up()

    def _apply(self, c: SqlCursor, record: LedgerRecord) -> None:
        event = record.event()
        agg, _ = event_kind(event)
        if agg == "Key":
            table, fold = self.keys_table, apply_key_event
        elif agg == "Alias":
            table, fold = self.aliases_table, apply_alias_event
        else:
            return
        oid = str(event["originator_id"])
        row = c.execute(f"SELECT doc, updated_seq FROM {table} WHERE id = ?", (oid,)).fetchone()
        if row is not None and int(row["updated_seq"]) >= record.seq:
            return  # another process got here first
        doc = fold(None if row is None else orjson.loads(row["doc"]), event)
        if doc is None:
            return
        self._upsert(c, table, oid, doc, record.seq)
        if agg == "Key" and doc["deleted"]:  # AWS deletes a key's aliases with the key
            rows = c.execute(f"SELECT id, doc FROM {self.aliases_table}").fetchall()
            for r in rows:
                alias = orjson.loads(r["doc"])
                if alias["target"] == oid:
                    dropped = drop_alias(alias, event["timestamp"])
                    self._upsert(c, self.aliases_table, r["id"], dropped, record.seq)

    @staticmethod
    def _upsert(c: SqlCursor, table: str, oid: str, doc: dict[str, Any], seq: int) -> None:
        c.execute(
            f"INSERT INTO {table} (id, doc, updated_seq) VALUES (?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, "
            f"updated_seq = excluded.updated_seq WHERE {table}.updated_seq < excluded.updated_seq",
            (oid, _dumps(doc), seq),
        )

    # ---------------------------------------------------------------- reading

    def _docs(self, table: str) -> list[dict[str, Any]]:
        self.catch_up()
        with self.db.transaction(commit=False) as c:
            rows = c.execute(f"SELECT doc FROM {table} ORDER BY id").fetchall()
        return [orjson.loads(r["doc"]) for r in rows]

    def key_docs(self) -> list[dict[str, Any]]:
        """Every key document (deleted keys included), caught up first."""
        return self._docs(self.keys_table)

    def key_doc(self, key_uuid: UUID, arn_for_errors: str) -> dict[str, Any]:
        """A live key's document; raises NotFoundError for unknown or deleted keys."""
        self.catch_up()
        with self.db.transaction(commit=False) as c:
            row = c.execute(
                f"SELECT doc FROM {self.keys_table} WHERE id = ?", (str(key_uuid),)
            ).fetchone()
        doc = None if row is None else orjson.loads(row["doc"])
        if doc is None or doc["deleted"]:
            raise NotFoundError(f"Key '{arn_for_errors}' does not exist")
        return doc  # type: ignore[no-any-return]

    def describe_key(self, key_uuid: UUID, arn_for_errors: str) -> dict[str, Any]:
        """DescribeKey's response; raises NotFoundError for an unknown or deleted key."""
        return {"KeyMetadata": key_metadata(self.key_doc(key_uuid, arn_for_errors))}

    def list_keys(
        self, *, limit: int | None = None, marker: str | None = None, arn_prefix: str = ""
    ) -> dict[str, Any]:
        """ListKeys (deleted keys are not listed), ordered by key id; ``arn_prefix``
        (``arn:aws:kms:<region>:<account>:``) keeps one account and region."""
        keys = [
            {"KeyId": d["key_id"], "KeyArn": d["arn"]}
            for d in self._docs(self.keys_table)
            if not d["deleted"] and d["arn"].startswith(arn_prefix)
        ]
        page, fields = paginate(keys, limit=limit, marker=marker)
        return {"Keys": page, **fields}

    def list_aliases(
        self,
        *,
        key_uuid: UUID | None = None,
        limit: int | None = None,
        marker: str | None = None,
        arn_prefix: str = "",
    ) -> dict[str, Any]:
        """ListAliases, all or of one key, ordered by alias name; ``arn_prefix`` keeps
        one account and region."""
        docs = [
            d
            for d in self._docs(self.aliases_table)
            if d["target"] is not None and d["arn"].startswith(arn_prefix)
        ]
        if key_uuid is not None:
            docs = [d for d in docs if d["target"] == str(key_uuid)]
        entries = [alias_entry(d) for d in sorted(docs, key=lambda d: d["name"])]
        page, fields = paginate(entries, limit=limit, marker=marker)
        return {"Aliases": page, **fields}

    def list_retirable_grants(
        self, *, retiring_principal: str, limit: int | None = None, marker: str | None = None
    ) -> dict[str, Any]:
        """ListRetirableGrants across all keys for one retiring principal."""
        if not retiring_principal:
            raise ValidationError(
                "1 validation error detected: Value at 'retiringPrincipal' failed to satisfy "
                "constraint: Member must have length greater than or equal to 1"
            )
        rows = [
            g
            for d in self._docs(self.keys_table)
            if not d["deleted"]
            for g in grant_entries(d)
            if g.get("RetiringPrincipal") == retiring_principal
        ]
        page, fields = paginate(rows, limit=limit, marker=marker)
        return {"Grants": page, **fields}

    def due_keys(self, now: datetime) -> list[UUID]:
        """Keys whose deletion, material expiry or automatic rotation is due at ``now``."""
        due = []
        for d in self._docs(self.keys_table):
            if d["deleted"]:
                continue
            deletion = d["state"] == "PendingDeletion" and d["deletion_date"] is not None
            expiry = (
                d.get("expiration_model") == "KEY_MATERIAL_EXPIRES"
                and d.get("valid_to") is not None
                and d["state"] in ("Enabled", "Disabled")
            )
            if (
                (deletion and datetime.fromisoformat(d["deletion_date"]) <= now)
                or (expiry and datetime.fromisoformat(d["valid_to"]) <= now)
                or (
                    d["state"] == "Enabled"
                    and d["next_rotation"] is not None
                    and datetime.fromisoformat(d["next_rotation"]) <= now
                )
            ):
                due.append(UUID(d["key_id"]))
        return due

    def snapshot(self) -> list[tuple[str, str]]:
        """Every catalog row (id, document JSON), for comparing rebuilds."""
        self.catch_up()
        with self.db.transaction(commit=False) as c:
            rows = c.execute(
                f"SELECT id, doc FROM {self.keys_table} UNION ALL "
                f"SELECT id, doc FROM {self.aliases_table} ORDER BY 1"
            ).fetchall()
        return [(r["id"], r["doc"]) for r in rows]


# -------------------------------------------------------------------- point in time


def state_at(
    db: LedgerDatabase, *, seq: int | None = None, time: datetime | None = None
) -> LedgerState:
    """The whole read model as it was after record ``seq``, or at ``time`` (every record
    whose timestamp is not after it, in log order), replayed from the log alone.

    Timestamps need not grow with ``seq`` (``maintenance run --now`` in the future,
    clock skew between nodes): a future-dated record is skipped, not a stop.
    """
    state = LedgerState()
    position = 0
    while True:
        records = db.read_records(position, 2000)
        if not records:
            return state
        for record in records:
            if seq is not None and record.seq > seq:
                return state
            event = record.event()
            if time is not None and datetime.fromisoformat(event["timestamp"]) > time:
                continue
            state.apply(record.seq, event)
        position = records[-1].seq


def describe_key_at(state: LedgerState, key_uuid: UUID, arn_for_errors: str) -> dict[str, Any]:
    """DescribeKey as of ``state``; raises NotFoundError if the key did not exist then."""
    doc = state.keys.get(str(key_uuid))
    if doc is None or doc["deleted"]:
        raise NotFoundError(f"Key '{arn_for_errors}' does not exist")
    return {"KeyMetadata": key_metadata(doc)}


def principals_at(state: LedgerState, account: str | None = None) -> list[dict[str, Any]]:
    """ListPrincipals as of ``state``: the live ones (optionally of one account), by ARN,
    in ``list_principals``' shape."""
    docs = [d for d in state.principals.values() if not d["deleted"]]
    docs = [d for d in docs if account is None or d["Account"] == account]
    drop = ("deleted", "PolicyDocuments")
    return [
        {k: v for k, v in d.items() if k not in drop} for d in sorted(docs, key=lambda d: d["Arn"])
    ]


def describe_principal_at(state: LedgerState, name: str, account: str) -> dict[str, Any]:
    """``describe_principal`` as of ``state`` (a user before a role of that name);
    raises NotFoundError if no such principal was live then."""
    for d in sorted(state.principals.values(), key=lambda d: d["Type"] != "user"):
        if d["Name"] == name and d["Account"] == account and not d["deleted"]:
            return {k: v for k, v in d.items() if k != "deleted"}
    raise NotFoundError(f"The principal with name {name} cannot be found.")


def list_aliases_at(state: LedgerState, key_uuid: UUID | None = None) -> dict[str, Any]:
    docs = [d for d in state.aliases.values() if d["target"] is not None]
    if key_uuid is not None:
        docs = [d for d in docs if d["target"] == str(key_uuid)]
    return {"Aliases": [alias_entry(d) for d in sorted(docs, key=lambda d: d["name"])]}


def list_grants_at(state: LedgerState, key_uuid: UUID, arn_for_errors: str) -> dict[str, Any]:
    doc = state.keys.get(str(key_uuid))
    if doc is None or doc["deleted"]:
        raise NotFoundError(f"Key '{arn_for_errors}' does not exist")
    return {"Grants": grant_entries(doc)}


def get_key_policy_at(state: LedgerState, key_uuid: UUID, arn_for_errors: str) -> dict[str, Any]:
    doc = state.keys.get(str(key_uuid))
    if doc is None or doc["deleted"]:
        raise NotFoundError(f"Key '{arn_for_errors}' does not exist")
    return {"Policy": key_policy(doc), "PolicyName": "default"}
