"""Relational history views for SQL on the projections: every grant with its end
(active, retired, revoked, or gone with its key), every backing-key version of every
key, and every principal with its state and policies.

One fold (``HistoryFold``) serves the tables (incremental catch-up, rebuild) and
brute-force answers (replay in memory), so both give the same rows. Rows and the
tracked position commit together per batch; the upserts are keyed, so a record applied
twice changes nothing. Grant tokens never reach these tables (the log holds only their
digests, and the digest is not copied).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from ledger.persistence import LedgerDatabase, SqlCursor

GRANTS = "kl_grants_view"
VERSIONS = "kl_key_versions"
PRINCIPALS = "kl_principals_view"
POSITION_NAME = "projection:history:v1"

GRANT_COLUMNS = (
    "grant_id",
    "key_arn",
    "grantee",
    "retiring",
    "operations",
    "constraints",
    "name",
    "state",
    "created_seq",
    "created_time",
    "ended_seq",
    "ended_time",
    "ended_by",
)
VERSION_COLUMNS = ("key_arn", "version", "material_id", "created_seq", "created_time", "kind")
PRINCIPAL_COLUMNS = (
    "arn",
    "name",
    "account",
    "principal_type",
    "state",
    "policies",
    "created_seq",
    "updated_seq",
)


def _j(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


class HistoryFold:
    """The rows of the three views, folded from decoded stored events in memory."""

    def __init__(self) -> None:
        self.grants: dict[str, dict[str, Any]] = {}
        self.versions: dict[tuple[str, int], dict[str, Any]] = {}
        self.principals: dict[str, dict[str, Any]] = {}
        self._version_count: dict[str, int] = {}
        self._materials: set[tuple[str, str]] = set()
        self._principal_arn: dict[str, str] = {}  # stream id -> ARN

    def apply(self, seq: int, event: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Fold one event; return the (view, row) pairs it changed."""
        topic = str(event.get("topic", ""))
        kind = topic.rsplit(":", 1)[-1]
        t = event.get("timestamp")
        key_arn = event.get("key_arn")
        changed: list[tuple[str, dict[str, Any]]] = []
        if kind == "Key.GrantCreated":
            g = event["grant"]
            gid = event["grant_id"]
            if gid not in self.grants:
                row = {
                    "grant_id": gid,
                    "key_arn": key_arn,
                    "grantee": g.get("GranteePrincipal"),
                    "retiring": g.get("RetiringPrincipal"),
                    "operations": _j(g.get("Operations")),
                    "constraints": _j(g.get("Constraints")),
                    "name": g.get("Name"),
                    "state": "active",
                    "created_seq": seq,
                    "created_time": t,
                    "ended_seq": None,
                    "ended_time": None,
                    "ended_by": None,
                }
                self.grants[gid] = row
                changed.append((GRANTS, row))
        elif kind in ("Key.GrantRetired", "Key.GrantRevoked"):
            ended = self.grants.get(event["grant_id"])
            if ended is not None and ended["state"] == "active":
                ended.update(
                    state="retired" if kind == "Key.GrantRetired" else "revoked",
                    ended_seq=seq,
                    ended_time=t,
                    ended_by=(event.get("call") or {}).get("principal"),
                )
                changed.append((GRANTS, ended))
        elif kind == "Key.Deleted":
            for row in self.grants.values():
                if row["key_arn"] == key_arn and row["state"] == "active":
                    row.update(state="deleted with key", ended_seq=seq, ended_time=t)
                    changed.append((GRANTS, row))
        if kind in ("Key.Created", "Key.Rotated", "Key.MaterialImported") and event.get("material"):
            assert isinstance(key_arn, str)
            material_id = event["material"]["material_id"]
            if (key_arn, material_id) in self._materials:
                return changed  # applied before
            self._materials.add((key_arn, material_id))
            n = self._version_count.get(key_arn, 0) + 1
            self._version_count[key_arn] = n
            vrow = {
                "key_arn": key_arn,
                "version": n,
                "material_id": material_id,
                "created_seq": seq,
                "created_time": t,
                "kind": {
                    "Key.Created": "CREATED",
                    "Key.MaterialImported": "IMPORTED",
                }.get(kind, event.get("rotation_type")),
            }
            self.versions[(key_arn, n)] = vrow
            changed.append((VERSIONS, vrow))
        if kind.startswith("Principal."):
            sid = str(event.get("originator_id"))
            if kind == "Principal.Created":
                self._principal_arn[sid] = event["arn"]
                known = self.principals.get(event["arn"])
                if known is not None and int(known["updated_seq"]) >= seq:
                    return changed  # applied before (a later re-creation starts afresh)
                prow = {
                    "arn": event["arn"],
                    "name": event["name"],
                    "account": event["account"],
                    "principal_type": event["principal_type"],
                    "state": "enabled",
                    "policies": _j({}),
                    "created_seq": seq,
                    "updated_seq": seq,
                }
                self.principals[event["arn"]] = prow
                changed.append((PRINCIPALS, prow))
            else:
                arn = self._principal_arn.get(sid)
                p = self.principals.get(arn) if arn else None
                if p is not None and int(p["updated_seq"]) < seq:
                    policies = orjson.loads(p["policies"])
                    if kind == "Principal.Disabled":
                        p["state"] = "disabled"
                    elif kind == "Principal.Enabled":
                        p["state"] = "enabled"
                    elif kind == "Principal.Deleted":
                        p["state"] = "deleted"
                    elif kind == "Principal.PolicyAttached":
                        policies[event["policy_name"]] = event["policy"]
                    elif kind == "Principal.PolicyDetached":
                        policies.pop(event["policy_name"], None)
                    p["policies"] = _j(policies)
                    p["updated_seq"] = seq
                    changed.append((PRINCIPALS, p))
        return changed

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of each view as the tables order them."""
        return {
            GRANTS: sorted(tuple(r[c] for c in GRANT_COLUMNS) for r in self.grants.values()),
            VERSIONS: sorted(tuple(r[c] for c in VERSION_COLUMNS) for r in self.versions.values()),
            PRINCIPALS: sorted(
                tuple(r[c] for c in PRINCIPAL_COLUMNS) for r in self.principals.values()
            ),
        }


_KEYS = {GRANTS: ("grant_id",), VERSIONS: ("key_arn", "version"), PRINCIPALS: ("arn",)}
_COLUMNS = {GRANTS: GRANT_COLUMNS, VERSIONS: VERSION_COLUMNS, PRINCIPALS: PRINCIPAL_COLUMNS}
_INTS = {"version", "created_seq", "updated_seq", "ended_seq"}


class HistoryViews:
    """The grants, key versions and principals views over a ledger database.

    The fold's memory (which grant belongs to which key, principal stream ids) is
    rebuilt from the tables on start, so catch-up resumes anywhere.
    """

    name = "history"

    def __init__(self, db: LedgerDatabase, *, batch_size: int = 5000) -> None:
        self.db = db
        self.tables = {v: db.table(v) for v in _COLUMNS}
        self.batch_size = batch_size
        self._lock = threading.Lock()
        with db.ddl_transaction() as c:
            for view, cols in _COLUMNS.items():
                defs = ", ".join(f"{col} {'BIGINT' if col in _INTS else 'TEXT'}" for col in cols)
                key = ", ".join(_KEYS[view])
                c.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.tables[view]} ({defs}, PRIMARY KEY ({key}))"
                )
            c.execute(
                f"CREATE INDEX IF NOT EXISTS kl_grants_view_key ON {self.tables[GRANTS]} (key_arn)"
            )

    @property
    def position(self) -> int:
        return self.db.get_position(POSITION_NAME)

    def _load(self, c: SqlCursor) -> HistoryFold:
        fold = HistoryFold()
        for r in c.execute(f"SELECT * FROM {self.tables[GRANTS]}").fetchall():
            fold.grants[r["grant_id"]] = dict(r)
        for r in c.execute(f"SELECT * FROM {self.tables[VERSIONS]}").fetchall():
            row = dict(r)
            fold.versions[(row["key_arn"], int(row["version"]))] = row
            fold._materials.add((row["key_arn"], row["material_id"]))
            fold._version_count[row["key_arn"]] = max(
                fold._version_count.get(row["key_arn"], 0), int(row["version"])
            )
        for r in c.execute(f"SELECT * FROM {self.tables[PRINCIPALS]}").fetchall():
            fold.principals[r["arn"]] = dict(r)
        return fold

    def catch_up(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Apply every record after the tracked position; return how many were read."""
        from ledger.domain.principals import Principal

        done = 0
        with self._lock:
            with self.db.transaction(commit=False) as c:
                fold = self._load(c)
            for arn in fold.principals:
                fold._principal_arn[str(Principal.stream_id(arn))] = arn
            position = self.db.get_position(POSITION_NAME)
            head = self.db.head_seq() if progress is not None else 0
            while True:
                records = self.db.read_records(position, self.batch_size)
                if not records:
                    return done
                changed: dict[tuple[str, tuple[Any, ...]], dict[str, Any]] = {}
                for record in records:
                    for view, row in fold.apply(record.seq, record.event()):
                        changed[(view, tuple(row[k] for k in _KEYS[view]))] = row
                with self.db.transaction(commit=True) as c:
                    for (view, _), row in changed.items():
                        self._upsert(c, view, row)
                    c.execute(
                        "INSERT INTO {positions} (name, position) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                        (POSITION_NAME, records[-1].seq),
                    )
                position = records[-1].seq
                done += len(records)
                if progress is not None:
                    progress(position, max(head, position))

    def _upsert(self, c: SqlCursor, view: str, row: dict[str, Any]) -> None:
        cols = _COLUMNS[view]
        keys = _KEYS[view]
        updates = ", ".join(f"{col} = excluded.{col}" for col in cols if col not in keys)
        c.execute(
            f"INSERT INTO {self.tables[view]} ({', '.join(cols)}) "
            f"VALUES ({', '.join('?' for _ in cols)}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}",
            [row[col] for col in cols],
        )

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Empty the views and rebuild them from the whole log; return records read."""
        with self._lock, self.db.transaction(commit=True) as c:
            for table in self.tables.values():
                c.execute(f"DELETE FROM {table}")
            c.execute("DELETE FROM {positions} WHERE name = ?", (POSITION_NAME,))
        return self.catch_up(progress)

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of each view, ordered as ``HistoryFold.rows``."""
        self.catch_up()
        out: dict[str, list[tuple[Any, ...]]] = {}
        with self.db.transaction(commit=False) as c:
            for view, cols in _COLUMNS.items():
                rows = c.execute(f"SELECT {', '.join(cols)} FROM {self.tables[view]}").fetchall()
                out[view] = sorted(
                    tuple(int(v) if k in _INTS and v is not None else v for k, v in dict(r).items())
                    for r in rows
                )
        return out

    def grants_of(self, key_arn: str) -> list[dict[str, Any]]:
        """Every grant ever made on the key, oldest first, with how it ended."""
        self.catch_up()
        with self.db.transaction(commit=False) as c:
            rows = c.execute(
                f"SELECT * FROM {self.tables[GRANTS]} WHERE key_arn = ? ORDER BY created_seq",
                (key_arn,),
            ).fetchall()
        return [dict(r) for r in rows]


def replay_history(db: LedgerDatabase, upto: int | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """The views' rows from a replay of the log in memory (up to seq ``upto``)."""
    fold = HistoryFold()
    position = 0
    while True:
        records: Sequence[Any] = db.read_records(position, 5000)
        if not records:
            break
        for record in records:
            if upto is not None and record.seq > upto:
                return fold.rows()
            fold.apply(record.seq, record.event())
        position = records[-1].seq
    return fold.rows()
