"""Auditor-grade tamper evidence over the stored log: HSM-signed checkpoints, proofs,
per-key histories, export bundles and the live verification of all of it.

Checkpoints are C2SP tlog-checkpoint bodies (origin ``keyledger/<ledger id>``, tree
size, root, and a ``time <RFC 3339>`` extension line) in the C2SP signed-note format,
signed by every active ledger signing key: Ed25519 keys generated and kept in the HSM
(``keyledger-ledger-signing-<hex>``). Each checkpoint is stored with the consistency
proof from the previous one. Rotating the signing key adds a second key; both sign
until the old one is retired (its HSM private key is then destroyed, its public key
kept for verification).

Security: nothing here reads key material; notes, proofs and public keys are public.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledger import merkle
from ledger.appendlog import node_reader
from ledger.errors import NotFoundError, TamperError, ValidationError
from ledger.offline_verify import (
    TreeBuilder,
    VerificationError,
    VerifierKey,
    checkpoint_body,
    format_consistency_proof,
    format_inclusion_proof,
    key_of_record,
    leaf_hash,
    note_signature_line,
    parse_checkpoint,
    parse_verifier_key,
    verifier_key_text,
    verify_consistency,
    verify_note,
)
from ledger.records import GENESIS

if TYPE_CHECKING:
    from ledger.persistence import LedgerDatabase, SqlCursor
    from ledger.service import KeyLedger

SIGNING_LABEL_PREFIX = "keyledger-ledger-signing-"


@dataclass(frozen=True)
class SigningKey:
    label: str
    name: str
    public_key: bytes
    created: str
    retired: str | None

    @property
    def vkey(self) -> str:
        return verifier_key_text(self.name, self.public_key)


@dataclass(frozen=True)
class StoredCheckpoint:
    id: int
    size: int
    root: bytes
    created: str
    note: str
    consistency: str | None


@dataclass(frozen=True)
class KeyHistoryEntry:
    seq: int
    key_seq: int
    key_prev: bytes
    record_hash: bytes
    data: bytes


def origin_of(ledger_id: str) -> str:
    return f"keyledger/{ledger_id}"


class _CursorSql:
    """``appendlog.Sql`` over a LedgerDatabase read cursor."""

    def __init__(self, cursor: SqlCursor) -> None:
        self._c = cursor

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r.values()) for r in self._c.execute(sql, params).fetchall()]

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise TypeError("read-only")


# ------------------------------------------------------------------ signing keys


def signing_keys(db: LedgerDatabase, *, active_only: bool = False) -> list[SigningKey]:
    """The ledger's signing keys, oldest first."""
    with db.transaction(commit=False) as c:
        rows = c.execute(
            "SELECT label, name, public_key, created, retired FROM {signing_keys} "
            "ORDER BY created, label"
        ).fetchall()
    keys = [
        SigningKey(
            label=r["label"],
            name=r["name"],
            public_key=bytes.fromhex(r["public_key"]),
            created=r["created"],
            retired=r["retired"],
        )
        for r in rows
    ]
    return [k for k in keys if k.retired is None] if active_only else keys


def verifier_keys(db: LedgerDatabase) -> list[VerifierKey]:
    return [parse_verifier_key(k.vkey) for k in signing_keys(db)]


def add_signing_key(ledger: KeyLedger) -> SigningKey:
    """Generate a new Ed25519 signing key in the HSM and make it active (it signs every
    checkpoint from now on, beside any other active key). Raises HsmError."""
    suffix = secrets.token_hex(8)
    label = SIGNING_LABEL_PREFIX + suffix
    name = f"{origin_of(ledger.ledger_id)}/{suffix}"
    public = ledger.keystore.generate_ledger_signing_key(label)
    created = ledger.clock.now().isoformat()
    with ledger.db.transaction(commit=True) as c:
        c.execute(
            "INSERT INTO {signing_keys} (label, name, public_key, created, retired) "
            "VALUES (?, ?, ?, ?, NULL)",
            (label, name, public.hex(), created),
        )
    return SigningKey(label, name, public, created, None)


def retire_signing_key(ledger: KeyLedger, name: str) -> SigningKey:
    """Stop signing with ``name`` and destroy its private key in the HSM (the public key
    stays, so older checkpoints still verify). Raises NotFoundError, or ValidationError
    for the last active key."""
    active = signing_keys(ledger.db, active_only=True)
    match = [k for k in active if k.name == name]
    if not match:
        raise NotFoundError(f"No active ledger signing key is named {name}.")
    if len(active) == 1:
        raise ValidationError("The last active ledger signing key cannot be retired.")
    key = match[0]
    retired = ledger.clock.now().isoformat()
    with ledger.db.transaction(commit=True) as c:
        c.execute("UPDATE {signing_keys} SET retired = ? WHERE label = ?", (retired, key.label))
    ledger.keystore.destroy_ledger_signing_key(key.label)
    return SigningKey(key.label, key.name, key.public_key, key.created, retired)


def ensure_signing_key(ledger: KeyLedger) -> list[SigningKey]:
    """The active signing keys, creating the first one if there is none."""
    active = signing_keys(ledger.db, active_only=True)
    return active or [add_signing_key(ledger)]


# ------------------------------------------------------------------ tree reads


def tree_size(db: LedgerDatabase) -> int:
    with db.transaction(commit=False) as c:
        row = c.execute("SELECT size FROM {tree_head} WHERE id = 1").fetchone()
    return 0 if row is None else int(row["size"])


def tree_root(db: LedgerDatabase, size: int) -> bytes:
    with db.transaction(commit=False) as c:
        return merkle.root(node_reader(_CursorSql(c)), size)


def inclusion_proof(db: LedgerDatabase, seq: int, size: int) -> list[bytes]:
    with db.transaction(commit=False) as c:
        return merkle.inclusion_proof(node_reader(_CursorSql(c)), seq - 1, size)


def consistency_proof(db: LedgerDatabase, size1: int, size2: int) -> list[bytes]:
    with db.transaction(commit=False) as c:
        return merkle.consistency_proof(node_reader(_CursorSql(c)), size1, size2)


def range_proof(db: LedgerDatabase, size: int, start: int, end: int) -> list[bytes]:
    with db.transaction(commit=False) as c:
        return merkle.range_proof(node_reader(_CursorSql(c)), size, start, end)


# ------------------------------------------------------------------ checkpoints


def checkpoints(db: LedgerDatabase) -> list[StoredCheckpoint]:
    with db.transaction(commit=False) as c:
        rows = c.execute(
            "SELECT id, size, root, created, note, consistency FROM {checkpoints} ORDER BY id"
        ).fetchall()
    return [
        StoredCheckpoint(
            id=int(r["id"]),
            size=int(r["size"]),
            root=bytes(r["root"]),
            created=r["created"],
            note=r["note"],
            consistency=r["consistency"],
        )
        for r in rows
    ]


def latest_checkpoint(db: LedgerDatabase) -> StoredCheckpoint | None:
    with db.transaction(commit=False) as c:
        r = c.execute(
            "SELECT id, size, root, created, note, consistency FROM {checkpoints} "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone()
    if r is None:
        return None
    return StoredCheckpoint(
        int(r["id"]), int(r["size"]), bytes(r["root"]), r["created"], r["note"], r["consistency"]
    )


def checkpoint_by_id(db: LedgerDatabase, checkpoint_id: int) -> StoredCheckpoint:
    for cp in checkpoints(db):
        if cp.id == checkpoint_id:
            return cp
    raise NotFoundError(f"Checkpoint {checkpoint_id} is not found.")


def make_checkpoint(ledger: KeyLedger) -> StoredCheckpoint:
    """Sign the current tree head with every active ledger signing key and store it with
    the consistency proof from the previous checkpoint. Raises HsmError, or
    NotFoundError for an empty ledger."""
    db = ledger.db
    keys = ensure_signing_key(ledger)
    with db.transaction(commit=False) as c:
        row = c.execute("SELECT size, frontier FROM {tree_head} WHERE id = 1").fetchone()
        if row is None or int(row["size"]) == 0:
            raise NotFoundError("The ledger is empty: there is nothing to checkpoint.")
        size = int(row["size"])
        root = merkle.root(node_reader(_CursorSql(c)), size)
    previous = latest_checkpoint(db)
    proof_text: str | None = None
    if previous is not None:
        if previous.size > size:
            raise TamperError(size + 1, f"the tree is smaller than checkpoint {previous.id}")
        proof = consistency_proof(db, previous.size, size) if previous.size < size else []
        proof_text = format_consistency_proof(previous.size, size, proof)
    now = ledger.clock.now()
    body = checkpoint_body(origin_of(ledger.ledger_id), size, root, [f"time {now.isoformat()}"])
    lines = []
    for key in keys:
        signature = ledger.keystore.ledger_sign(key.label, body.encode())
        lines.append(note_signature_line(key.name, parse_verifier_key(key.vkey).key_id, signature))
    note = body + "\n" + "".join(lines)
    new_id = (previous.id if previous is not None else 0) + 1
    with db.transaction(commit=True) as c:
        c.execute(
            "INSERT INTO {checkpoints} (id, size, root, created, note, consistency) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (new_id, size, root, now.isoformat(), note, proof_text),
        )
    return StoredCheckpoint(new_id, size, root, now.isoformat(), note, proof_text)


def checkpoint_due(ledger: KeyLedger, now: datetime) -> str | None:
    """Why a checkpoint is due now (``"events"``, ``"interval"``, ``"heartbeat"``), or
    None. Settings: every N events, every N seconds when anything was appended, and a
    heartbeat after N seconds even when idle."""
    s = ledger.settings
    latest = latest_checkpoint(ledger.db)
    size = tree_size(ledger.db)
    if latest is None:
        return "events" if size > 0 else None
    grown = size - latest.size
    age = (now - datetime.fromisoformat(latest.created)).total_seconds()
    if grown >= s.checkpoint_every_events:
        return "events"
    if grown > 0 and age >= s.checkpoint_every_seconds:
        return "interval"
    if age >= s.checkpoint_heartbeat_seconds:
        return "heartbeat"
    return None


# ------------------------------------------------------------------ proofs


def prove_inclusion(db: LedgerDatabase, seq: int, checkpoint_id: int | None = None) -> str:
    """The c2sp.org/tlog-proof text for record ``seq`` against the latest (or the named)
    checkpoint. Raises NotFoundError or ValidationError."""
    cp = checkpoint_by_id(db, checkpoint_id) if checkpoint_id else latest_checkpoint(db)
    if cp is None:
        raise NotFoundError("There is no checkpoint yet: run keyledger audit checkpoint.")
    if not 1 <= seq <= cp.size:
        raise ValidationError(f"seq must be between 1 and {cp.size} (checkpoint {cp.id}).")
    return format_inclusion_proof(seq - 1, inclusion_proof(db, seq, cp.size), cp.note)


def prove_consistency(db: LedgerDatabase, size1: int, size2: int) -> str:
    """The consistency proof text between tree sizes. Raises ValidationError."""
    size = tree_size(db)
    if not 1 <= size1 <= size2 <= size:
        raise ValidationError(f"Need 1 <= --from-size <= --to-size <= {size}.")
    return format_consistency_proof(size1, size2, consistency_proof(db, size1, size2))


def key_history(db: LedgerDatabase, key_arn: str) -> list[KeyHistoryEntry]:
    """Every record of one key, in order, with its per-key chain fields."""
    with db.transaction(commit=False) as c:
        rows = c.execute(
            "SELECT k.seq AS seq, k.key_seq AS key_seq, k.key_prev AS key_prev, "
            "c.record_hash AS record_hash, e.state AS state FROM {key_chain} k "
            "JOIN {chain} c ON c.seq = k.seq JOIN {events} e ON e.{nid} = c.notification_id "
            "WHERE k.key_arn = ? ORDER BY k.key_seq",
            (key_arn,),
        ).fetchall()
    return [
        KeyHistoryEntry(
            int(r["seq"]),
            int(r["key_seq"]),
            bytes(r["key_prev"]),
            bytes(r["record_hash"]),
            bytes(r["state"]),
        )
        for r in rows
    ]


def verify_key_history(entries: Sequence[KeyHistoryEntry], key_arn: str) -> None:
    """Check a key's records link back to its first record (key_seq 1, zero key_prev).
    Raises TamperError naming the global position of the first bad record."""
    prev, expected = GENESIS, 1
    for e in entries:
        if e.key_seq != expected:
            raise TamperError(e.seq, f"key chain of {key_arn} jumps to {e.key_seq}")
        if e.key_prev != prev:
            raise TamperError(e.seq, f"key chain break (key {key_arn})")
        if key_of_record(e.data) != key_arn:
            raise TamperError(e.seq, f"record does not belong to {key_arn}")
        prev, expected = e.record_hash, expected + 1


# ------------------------------------------------------------------ live verification


@dataclass
class LiveReport:
    count: int
    head: bytes
    checkpoints_valid: int
    problems: list[str]


def verify_checkpoints_live(
    db: LedgerDatabase,
    leaves: Iterator[bytes],
    count: int,
    keys: Sequence[VerifierKey],
    origin: str,
) -> tuple[int, list[str]]:
    """Replay the tree from ``leaves`` (all ``count`` of them, in order) and check every
    stored checkpoint: signature by a trusted key, root at its size, consistency with
    the previous one, and no checkpoint beyond the log (truncation). Returns
    ``(valid checkpoints, problems)``; each problem names a position."""
    problems: list[str] = []
    stored = checkpoints(db)
    builder = TreeBuilder()
    valid = 0
    previous: StoredCheckpoint | None = None
    for cp in stored:
        bad = False
        try:
            verify_note(cp.note, keys)
            body = parse_checkpoint(cp.note.split("\n\n", 1)[0] + "\n")
            if body.origin != origin or body.size != cp.size or body.root != cp.root:
                raise VerificationError("checkpoint fields disagree with its note")
        except VerificationError as err:
            problems.append(f"position {cp.size}: checkpoint {cp.id}: {err}")
            bad = True
        if cp.size > count:
            problems.append(
                f"position {count + 1}: log truncated: checkpoint {cp.id} covers {cp.size} "
                f"records, the log ends at {count}"
            )
            break
        while builder.size < cp.size:
            builder.append(next(leaves))
        if builder.root() != cp.root:
            problems.append(
                f"position {cp.size}: records do not match checkpoint {cp.id} of size {cp.size}"
            )
            bad = True
        if previous is not None and cp.consistency is not None and previous.size < cp.size:
            from ledger.offline_verify import parse_consistency_proof

            try:
                s1, s2, proof = parse_consistency_proof(cp.consistency)
                if (s1, s2) != (previous.size, cp.size):
                    raise VerificationError("proof sizes differ")
                verify_consistency(s1, s2, proof, previous.root, cp.root)
            except VerificationError:
                problems.append(
                    f"position {cp.size}: checkpoint {cp.id} (size {cp.size}) is inconsistent "
                    f"with checkpoint {previous.id} of size {previous.size}"
                )
                bad = True
        if not bad:
            valid += 1
        previous = cp
    return valid, problems


def leaf_hashes(db: LedgerDatabase) -> Iterator[bytes]:
    """Leaf hashes of the stored records in chain order."""
    for e in db.iter_chain_states():
        yield leaf_hash(e)


def write_export(ledger: KeyLedger, out: Path, from_seq: int, to_seq: int | None) -> Any:
    """Write an audit bundle of records ``from_seq..to_seq`` (default: to the head) with
    every checkpoint and the proofs between them. Raises ValidationError."""
    from ledger.bundle import BundleRecord, write_bundle

    db = ledger.db
    head = db.head_seq()
    last = head if to_seq is None else to_seq
    if not 1 <= from_seq <= last <= head:
        raise ValidationError(f"Need 1 <= --from-seq <= --to-seq <= {head}.")
    prev_hash = GENESIS
    if from_seq > 1:
        prev_hash = db.read_records(from_seq - 2, 1)[0].record_hash
    cps = checkpoints(db)
    if to_seq is not None and from_seq == 1:
        # An explicit end: later checkpoints are not the bundle's (nothing was cut off).
        cps = [cp for cp in cps if cp.size <= last]

    def records() -> Iterator[BundleRecord]:
        for r in db.iter_records_with_keys(from_seq, last):
            yield BundleRecord(*r)

    return write_bundle(
        out,
        ledger_id=ledger.ledger_id,
        origin=origin_of(ledger.ledger_id),
        from_seq=from_seq,
        prev_hash=prev_hash,
        records=records(),
        checkpoints=[(cp.id, cp.size, cp.note) for cp in cps],
        consistency_proof=lambda a, b: consistency_proof(db, a, b),
        range_proof=lambda size, a, b: range_proof(db, size, a, b),
        verifier_keys=[k.vkey for k in signing_keys(db)],
    )


__all__ = [
    "KeyHistoryEntry",
    "LiveReport",
    "SigningKey",
    "StoredCheckpoint",
    "add_signing_key",
    "checkpoint_due",
    "checkpoints",
    "ensure_signing_key",
    "key_history",
    "make_checkpoint",
    "origin_of",
    "prove_consistency",
    "prove_inclusion",
    "retire_signing_key",
    "signing_keys",
    "tree_root",
    "tree_size",
    "verifier_keys",
    "verify_checkpoints_live",
    "verify_key_history",
    "write_export",
]
