"""What the storing transaction adds beside the global chain: the per-key chain and the
RFC 9162 Merkle tree over the record bytes.

Both run inside the transaction that stores the events (after PostgreSQL's table
lock), so they can never disagree with the log:

* ``kl_key_chain(seq, key_arn, key_seq, key_prev)``: for every record naming a key
  (top-level ``key_arn``), its 1-based position in that key's history and the hash of
  the key's previous record (32 zero bytes before a key's first record);
  ``kl_key_heads(key_arn, key_seq, record_hash)`` holds each key's last record.
* ``kl_tree(level, idx, hash)``: perfect subtree hashes at levels ``>= MIN_STORED_LEVEL``
  (lower levels are recomputed from at most ``2**MIN_STORED_LEVEL - 1`` record bytes),
  and ``kl_tree_head(id, size, frontier)``: the right edge of the tree, so one append
  costs O(log n) hashing and, amortised, 1/8 of a row.
* ``kl_state_version(id, n)``: a counter that every storing transaction holding an
  event other than a recorded call (a change of key, alias, grant or principal state)
  increments (``bump_state_version``), so a process can tell with one read whether
  the aggregates it has cached could be out of date.

A ledger written before these tables existed is indexed on its next append
(``backfill``), inside that transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from ledger.offline_verify import TreeBuilder, key_of_record, leaf_hash, node_hash
from ledger.records import GENESIS

TREE_TABLE = "kl_tree"
TREE_HEAD_TABLE = "kl_tree_head"
KEY_CHAIN_TABLE = "kl_key_chain"
KEY_HEADS_TABLE = "kl_key_heads"
CHECKPOINTS_TABLE = "kl_checkpoints"
SIGNING_KEYS_TABLE = "kl_signing_keys"
STATE_TABLE = "kl_state_version"
MIN_STORED_LEVEL = 4
_IN_CHUNK = 500


def create_statements(blob: str, bigint: str, prefix: str = "") -> list[str]:
    """DDL of the tables above (``blob``: BLOB or bytea; ``prefix``: schema and dot)."""
    p = prefix
    return [
        f"CREATE TABLE IF NOT EXISTS {p}{KEY_CHAIN_TABLE} (seq {bigint} PRIMARY KEY, "
        f"key_arn TEXT NOT NULL, key_seq {bigint} NOT NULL, key_prev {blob} NOT NULL)",
        f"CREATE INDEX IF NOT EXISTS {KEY_CHAIN_TABLE}_key ON {p}{KEY_CHAIN_TABLE} "
        "(key_arn, key_seq)",
        f"CREATE TABLE IF NOT EXISTS {p}{KEY_HEADS_TABLE} (key_arn TEXT PRIMARY KEY, "
        f"key_seq {bigint} NOT NULL, record_hash {blob} NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {p}{TREE_TABLE} (level INTEGER NOT NULL, "
        f"idx {bigint} NOT NULL, hash {blob} NOT NULL, PRIMARY KEY (level, idx))",
        f"CREATE TABLE IF NOT EXISTS {p}{TREE_HEAD_TABLE} (id INTEGER PRIMARY KEY, "
        f"size {bigint} NOT NULL, last_hash {blob} NOT NULL, frontier {blob} NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {p}{CHECKPOINTS_TABLE} (id {bigint} PRIMARY KEY, "
        f"size {bigint} NOT NULL, root {blob} NOT NULL, created TEXT NOT NULL, "
        "note TEXT NOT NULL, consistency TEXT)",
        f"CREATE TABLE IF NOT EXISTS {p}{SIGNING_KEYS_TABLE} (label TEXT PRIMARY KEY, "
        "name TEXT NOT NULL, public_key TEXT NOT NULL, created TEXT NOT NULL, "
        "retired TEXT)",
        f"CREATE TABLE IF NOT EXISTS {p}{STATE_TABLE} (id INTEGER PRIMARY KEY, "
        f"n {bigint} NOT NULL)",
    ]


class Sql(Protocol):
    """The storing transaction's cursor, with ``?`` placeholders and ``{name}`` tables
    (``{chain}``, ``{events}``, ``{nid}``, ``{tree}``, ``{tree_head}``,
    ``{key_chain}``, ``{key_heads}``, ``{state}``)."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class Frontier:
    """The right edge of a tree of ``size`` leaves: its perfect subtrees' hashes, the
    largest (leftmost) first, one per set bit of ``size``."""

    __slots__ = ("nodes", "size")

    def __init__(self, size: int = 0, nodes: list[bytes] | None = None) -> None:
        self.size = size
        self.nodes = nodes if nodes is not None else []
        if len(self.nodes) != size.bit_count():
            raise LookupError("tree frontier does not match its size")

    @classmethod
    def from_packed(cls, size: int, packed: bytes) -> Frontier:
        return cls(size, [packed[i : i + 32] for i in range(0, len(packed), 32)])

    def packed(self) -> bytes:
        return b"".join(self.nodes)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add a leaf hash; returns the perfect nodes it completes ``(level, idx, hash)``,
        the leaf itself first."""
        idx, n, level, digest = self.size, self.size, 0, leaf
        done = [(0, idx, leaf)]
        while n & 1:
            digest = node_hash(self.nodes.pop(), digest)
            level, idx, n = level + 1, idx >> 1, n >> 1
            done.append((level, idx, digest))
        self.nodes.append(digest)
        self.size += 1
        return done

    def root(self) -> bytes:
        """The RFC 9162 root of the tree (SHA-256 of nothing when empty)."""
        if not self.nodes:
            return TreeBuilder().root()
        digest = self.nodes[-1]
        for left in reversed(self.nodes[:-1]):
            digest = node_hash(left, digest)
        return digest


def pack_frontier(frontier: Frontier) -> bytes:
    return frontier.packed()


def bump_state_version(sql: Sql) -> None:
    """Count one more committed change of aggregate state (``STATE_TABLE``); call inside
    the storing transaction, so the count moves exactly when the change commits."""
    sql.many(
        "INSERT INTO {state} AS s (id, n) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET n = s.n + 1",
        [()],
    )


def leaves_between(sql: Sql, first_seq: int, last_seq: int) -> list[bytes]:
    """Leaf hashes of records ``first_seq..last_seq`` (inclusive), in order."""
    got = sql.rows(
        "SELECT c.seq, e.state FROM {chain} c JOIN {events} e ON e.{nid} = c.notification_id "
        "WHERE c.seq BETWEEN ? AND ? ORDER BY c.seq",
        (first_seq, last_seq),
    )
    if len(got) != last_seq - first_seq + 1:
        raise LookupError(f"records {first_seq}..{last_seq} are not all stored")
    return [leaf_hash(bytes(state)) for _, state in got]


def node_reader(sql: Sql) -> Callable[[int, int], bytes]:
    """``node(level, idx)``: the perfect subtree hash, stored or recomputed from records.

    Raises LookupError when a stored node or a record it needs is missing.
    """

    def node(level: int, idx: int) -> bytes:
        if level >= MIN_STORED_LEVEL:
            got = sql.rows("SELECT hash FROM {tree} WHERE level = ? AND idx = ?", (level, idx))
            if not got:
                raise LookupError(f"tree node ({level}, {idx}) is missing")
            return bytes(got[0][0])
        width = 1 << level
        builder = TreeBuilder()
        for leaf in leaves_between(sql, idx * width + 1, (idx + 1) * width):
            builder.append(leaf)
        return builder.root()

    return node


class AppendIndexer:
    """Extends the per-key chain and the Merkle tree inside the storing transaction.

    Keeps the tree's right edge in memory between transactions of this process; it is
    trusted only while the stored chain head is the one it was computed for, so a
    rolled-back transaction or another process's append makes it reload.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: tuple[int, bytes, Frontier] | None = None
        self.tree_enabled = True  # the benchmark measures appends without the tree

    def extend(
        self,
        sql: Sql,
        head_seq: int,
        head_hash: bytes,
        chain: Sequence[tuple[int, int, bytes, bytes]],
        states: Sequence[bytes],
    ) -> None:
        """Index the new records ``chain`` (rows ``seq, nid, hash, prev``) whose bytes
        are ``states``; the log held ``head_seq`` records ending in ``head_hash``."""
        if not chain:
            return
        with self._lock:
            frontier = self._frontier(sql, head_seq, head_hash)
            self._cached = None
            self._key_chain(sql, chain, states)
            if self.tree_enabled:
                self._tree(sql, frontier, states)
                sql.many(
                    "UPDATE {tree_head} SET size = ?, last_hash = ?, frontier = ? WHERE id = 1",
                    [(frontier.size, chain[-1][2], pack_frontier(frontier))],
                )
                self._cached = (frontier.size, chain[-1][2], frontier)

    def forget(self) -> None:
        with self._lock:
            self._cached = None

    # ------------------------------------------------------------------ internals

    def _frontier(self, sql: Sql, head_seq: int, head_hash: bytes) -> Frontier:
        cached = self._cached
        if cached is not None and cached[0] == head_seq and cached[1] == head_hash:
            return cached[2]
        got = sql.rows("SELECT size, last_hash, frontier FROM {tree_head} WHERE id = 1")
        if not got:
            sql.many(
                "INSERT INTO {tree_head} (id, size, last_hash, frontier) VALUES (1, 0, ?, ?)",
                [(GENESIS, b"")],
            )
            size, last, packed = 0, GENESIS, b""
        else:
            size, last, packed = int(got[0][0]), bytes(got[0][1]), bytes(got[0][2])
        if size > head_seq:
            raise LookupError(f"tree holds {size} leaves but the log only {head_seq} records")
        frontier = Frontier.from_packed(size, packed)
        if size < head_seq or (size == head_seq and size > 0 and last != head_hash):
            if size == head_seq:
                raise LookupError("tree head does not match the chain head")
            self._backfill(sql, frontier, size, head_seq)
        return frontier

    def _backfill(self, sql: Sql, frontier: Frontier, size: int, head_seq: int) -> None:
        """Index records ``size+1..head_seq`` written before this index existed."""
        done = size
        keyed = {r[0] for r in sql.rows("SELECT seq FROM {key_chain} WHERE seq > ?", (size,))}
        while done < head_seq:
            last = min(head_seq, done + 5000)
            got = sql.rows(
                "SELECT c.seq, c.notification_id, c.record_hash, c.prev, e.state FROM {chain} c "
                "JOIN {events} e ON e.{nid} = c.notification_id "
                "WHERE c.seq BETWEEN ? AND ? ORDER BY c.seq",
                (done + 1, last),
            )
            chain = [(int(r[0]), int(r[1]), bytes(r[2]), bytes(r[3])) for r in got]
            states = [bytes(r[4]) for r in got]
            todo = [(c, s) for c, s in zip(chain, states, strict=True) if c[0] not in keyed]
            if todo:
                self._key_chain(sql, [c for c, _ in todo], [s for _, s in todo])
            self._tree(sql, frontier, states)
            done = last
        if head_seq:
            sql.many(
                "UPDATE {tree_head} SET size = ?, last_hash = ?, frontier = ? WHERE id = 1",
                [(frontier.size, _chain_hash(sql, head_seq), pack_frontier(frontier))],
            )

    def _key_chain(
        self, sql: Sql, chain: Sequence[tuple[int, int, bytes, bytes]], states: Sequence[bytes]
    ) -> None:
        keys = [key_of_record(s) for s in states]
        distinct = sorted({k for k in keys if k is not None})
        if not distinct:
            return
        heads: dict[str, tuple[int, bytes]] = {}
        for chunk in _chunks(distinct, _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            for key, kseq, rhash in sql.rows(
                "SELECT key_arn, key_seq, record_hash FROM {key_heads} "
                f"WHERE key_arn IN ({marks})",
                chunk,
            ):
                heads[str(key)] = (int(kseq), bytes(rhash))
        rows: list[tuple[int, str, int, bytes]] = []
        for (seq, _, digest, _), key in zip(chain, keys, strict=True):
            if key is None:
                continue
            kseq, kprev = heads.get(key, (0, GENESIS))
            rows.append((seq, key, kseq + 1, kprev))
            heads[key] = (kseq + 1, digest)
        sql.many("INSERT INTO {key_chain} VALUES (?, ?, ?, ?)", rows)
        sql.many(
            "INSERT INTO {key_heads} (key_arn, key_seq, record_hash) VALUES (?, ?, ?) "
            "ON CONFLICT (key_arn) DO UPDATE SET key_seq = excluded.key_seq, "
            "record_hash = excluded.record_hash",
            [(k, heads[k][0], heads[k][1]) for k in distinct],
        )

    @staticmethod
    def _tree(sql: Sql, frontier: Frontier, states: Iterable[bytes]) -> None:
        nodes: list[tuple[int, int, bytes]] = []
        for state in states:
            for level, idx, digest in frontier.append(leaf_hash(state)):
                if level >= MIN_STORED_LEVEL:
                    nodes.append((level, idx, digest))
        if nodes:
            sql.many("INSERT INTO {tree} (level, idx, hash) VALUES (?, ?, ?)", nodes)


def _chain_hash(sql: Sql, seq: int) -> bytes:
    got = sql.rows("SELECT record_hash FROM {chain} WHERE seq = ?", (seq,))
    return bytes(got[0][0]) if got else GENESIS


def _chunks(items: Sequence[str], n: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


__all__ = [
    "CHECKPOINTS_TABLE",
    "KEY_CHAIN_TABLE",
    "KEY_HEADS_TABLE",
    "MIN_STORED_LEVEL",
    "SIGNING_KEYS_TABLE",
    "TREE_HEAD_TABLE",
    "TREE_TABLE",
    "AppendIndexer",
    "Frontier",
    "Sql",
    "create_statements",
    "leaves_between",
    "node_reader",
]
