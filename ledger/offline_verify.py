"""The auditor's verifier: checks a KeyLedger export bundle with nothing but the bundle
and the ledger's public key.

This module imports only the Python standard library and ``cryptography`` (a test
holds it to that), so an auditor can read it whole and run it alone::

    python -m ledger.offline_verify --bundle DIR --public-key ledger.vkey

What it checks:

* RFC 9162 Merkle trees (SHA-256; leaf = H(0x00 || record bytes), node =
  H(0x01 || left || right), empty tree = H("")): roots, inclusion and consistency
  proofs, and range proofs for partial exports (our own format, defined by
  ``range_root``).
* C2SP signed notes with Ed25519 keys (https://c2sp.org/signed-note) whose text is a
  C2SP tlog-checkpoint (https://c2sp.org/tlog-checkpoint).
* A bundle: every record's bytes hash to its ``chain.tsv`` row, the global chain and
  each key's chain link, every checkpoint is signed by a trusted key, consistent with
  the one before it and equal to the tree of the records, and no record is left
  outside a signed checkpoint.

Nothing here returns False: functions raise ``VerificationError``, and
``verify_bundle`` reports every problem as one ``INVALID: ...`` line.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ZERO = bytes(32)
_ZERO_HEX = ZERO.hex()
EMPTY_ROOT = hashlib.sha256(b"").digest()
BUNDLE_FORMAT = "keyledger-audit-bundle/1"
INCLUSION_HEADER = "c2sp.org/tlog-proof@v1"
CONSISTENCY_HEADER = "keyledger.dev/consistency-proof@v1"
RANGE_HEADER = "keyledger.dev/range-proof@v1"
SIG_PREFIX = "\u2014 "  # em dash and space: how C2SP signed notes start a signature
ALG_ED25519 = 1
MAX_NOTE_SIGNATURES = 100  # as golang.org/x/mod/sumdb/note

_sha256 = hashlib.sha256


class VerificationError(Exception):
    """A proof, signature, note or bundle does not verify; the message says why."""


# ---------------------------------------------------------------- Merkle tree (RFC 9162)


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2): where RFC 9162 splits."""
    return 1 << ((n - 1).bit_length() - 1)


class TreeBuilder:
    """A streaming RFC 9162 tree: holds only the right edge's perfect subtrees (one per
    set bit of ``size``, largest first), so memory is O(log n), ``append`` costs one
    node hash amortised and ``root`` at most log2(n) node hashes."""

    __slots__ = ("_nodes", "size")

    def __init__(self) -> None:
        self._nodes: list[bytes] = []
        self.size = 0

    def append(self, leaf: bytes) -> None:
        """Add the next leaf hash."""
        n, digest, nodes = self.size, leaf, self._nodes
        while n & 1:
            digest = node_hash(nodes.pop(), digest)
            n >>= 1
        nodes.append(digest)
        self.size += 1

    def root(self) -> bytes:
        """The root of the leaves appended so far."""
        return _fold_right(self._nodes) if self._nodes else EMPTY_ROOT


def _fold_right(hashes: Sequence[bytes]) -> bytes:
    digest = hashes[-1]
    for left in reversed(hashes[:-1]):
        digest = node_hash(left, digest)
    return digest


def root_of(leaves: Iterable[bytes]) -> bytes:
    """The root of the tree of ``leaves`` (leaf hashes)."""
    builder = TreeBuilder()
    for leaf in leaves:
        builder.append(leaf)
    return builder.root()


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 §2.1.3.2: the leaf hash ``leaf`` is leaf ``index`` (0-based) of the
    tree of ``size`` leaves with ``root``. Raises VerificationError."""
    if not 0 <= index < size:
        raise VerificationError("inclusion proof: index outside the tree")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise VerificationError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise VerificationError("inclusion proof does not lead to the root")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """RFC 9162 §2.1.4.2: the tree of ``size2`` with ``root2`` extends the tree of
    ``size1`` with ``root1``. Raises VerificationError."""
    if not 0 <= size1 <= size2:
        raise VerificationError("consistency proof: sizes out of order")
    if size1 == size2:
        if proof or root1 != root2:
            raise VerificationError("consistency proof: equal sizes need equal roots")
        return
    if size1 == 0:
        if proof:
            raise VerificationError("consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise VerificationError("consistency proof is empty")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # size1 is a power of two: root1 is a node of tree 2
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise VerificationError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0 or fr != root1 or sr != root2:
        raise VerificationError("consistency proof does not lead to both roots")


class _RangeBuilder:
    """Leaves ``[start, start + count)`` streamed in, kept as their maximal aligned
    perfect subtrees ``(level, index, hash)`` (O(log n) of them)."""

    __slots__ = ("blocks", "end", "start")

    def __init__(self, start: int) -> None:
        self.start = self.end = start
        self.blocks: list[tuple[int, int, bytes]] = []

    def append(self, leaf: bytes) -> None:
        blocks, level, index, digest = self.blocks, 0, self.end, leaf
        # A right child merges with its left sibling when that sibling is in the range.
        while index & 1 and blocks and blocks[-1][0] == level:
            digest = node_hash(blocks.pop()[2], digest)
            level, index = level + 1, index >> 1
        blocks.append((level, index, digest))
        self.end += 1

    def extend(self, leaves: list[bytes]) -> None:
        """Add many leaf hashes at once, one tree level at a time (the same blocks as
        ``append`` for each; a level's node hashes are one list comprehension)."""
        blocks, level, index, nodes = self.blocks, 0, self.end, leaves
        self.end += len(leaves)
        tails: list[tuple[int, int, bytes]] = []  # right-edge leftovers, low level first
        node = _sha256
        while nodes:
            if index & 1:
                if blocks and blocks[-1][0] == level:  # its left sibling is a block
                    nodes = [blocks.pop()[2], *nodes]
                    index -= 1
                else:  # the sibling is before the range: a maximal block
                    blocks.append((level, index, nodes[0]))
                    nodes, index = nodes[1:], index + 1
            if len(nodes) & 1:
                tails.append((level, index + len(nodes) - 1, nodes[-1]))
                nodes = nodes[:-1]
            it = iter(nodes)
            nodes = [node(b"\x01" + a + b).digest() for a, b in zip(it, it, strict=False)]
            level, index = level + 1, index >> 1
        blocks.extend(reversed(tails))

    def root(self) -> bytes:
        """The root of a builder that started at leaf 0."""
        return _fold_right([b[2] for b in self.blocks]) if self.blocks else EMPTY_ROOT


def range_root(
    size: int, start: int, end: int, leaves: Iterable[bytes], proof: Sequence[bytes]
) -> bytes:
    """The root of the tree of ``size`` leaves, from its leaf hashes ``[start, end)``
    (0-based, in order) and a range proof.

    The proof is defined by one walk over the RFC 9162 tree shape (split at the largest
    power of two below the width): a subtree entirely inside the range is computed from
    the leaves, a subtree entirely outside it is the next proof hash (left before
    right), any other subtree is split. Raises VerificationError when the range, the
    number of leaves or the number of proof hashes does not fit.
    """
    builder = _RangeBuilder(start)
    for leaf in leaves:
        builder.append(leaf)
    if builder.end != end:
        raise VerificationError(f"range proof: {builder.end - start} leaves for [{start}, {end})")
    return _range_root(size, start, end, builder.blocks, proof)


def _range_root(
    size: int,
    start: int,
    end: int,
    blocks: Sequence[tuple[int, int, bytes]],
    proof: Sequence[bytes],
) -> bytes:
    if not 0 <= start < end <= size:
        raise VerificationError("range proof: range outside the tree")
    hashes, at = iter(proof), 0

    def inside(lo: int, hi: int) -> bytes:
        # A subtree inside the range is one maximal block or, on the right edge of the
        # tree, a run of smaller ones: its RFC 9162 hash folds them from the right.
        nonlocal at
        first = at
        while at < len(blocks) and (blocks[at][1] << blocks[at][0]) < hi:
            at += 1
        run = blocks[first:at]
        if not run or run[0][1] << run[0][0] != lo or (run[-1][1] + 1) << run[-1][0] != hi:
            raise VerificationError("range proof: leaves do not tile the range")
        return _fold_right([b[2] for b in run])

    def walk(lo: int, hi: int) -> bytes:
        if hi <= start or lo >= end:
            got = next(hashes, None)
            if got is None:
                raise VerificationError("range proof is too short")
            return got
        if start <= lo and hi <= end:
            return inside(lo, hi)
        k = lo + _split(hi - lo)
        return node_hash(walk(lo, k), walk(k, hi))

    root = walk(0, size)
    if next(hashes, None) is not None:
        raise VerificationError("range proof is too long")
    return root


# ---------------------------------------------------------------- C2SP signed notes


@dataclass(frozen=True)
class VerifierKey:
    """A trusted Ed25519 note key: ``name``, 4-byte ``key_id``, 32-byte ``public_key``."""

    name: str
    key_id: bytes
    public_key: bytes


def _check_name(name: str) -> None:
    if not name or "+" in name or any(ch.isspace() for ch in name):
        raise VerificationError(f"malformed key name {name!r}: empty, space or '+'")


def key_id(name: str, public_key: bytes) -> bytes:
    """C2SP signed-note key id: SHA-256(name || 0x0A || 0x01 || public key)[:4]."""
    return _sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


def verifier_key_text(name: str, public_key: bytes) -> str:
    """``<name>+<8 hex key id>+<base64(0x01 || public key)>``; raises
    VerificationError for a bad name or a key that is not 32 bytes."""
    _check_name(name)
    if len(public_key) != 32:
        raise VerificationError("an Ed25519 public key has 32 bytes")
    blob = base64.b64encode(bytes([ALG_ED25519]) + public_key).decode()
    return f"{name}+{key_id(name, public_key).hex()}+{blob}"


def parse_verifier_key(text: str) -> VerifierKey:
    """Parse ``verifier_key_text`` output; raises VerificationError if it is malformed,
    not Ed25519, or its key id does not match the name and key."""
    parts = text.strip().split("+", 2)
    if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
        raise VerificationError("malformed verifier key")
    name = parts[0]
    _check_name(name)
    try:
        blob = base64.b64decode(parts[2], validate=True)
    except binascii.Error:
        raise VerificationError("malformed verifier key") from None
    if len(blob) != 33 or blob[0] != ALG_ED25519:
        raise VerificationError("verifier key is not an Ed25519 key")
    public = blob[1:]
    if key_id(name, public).hex() != parts[1]:
        raise VerificationError("verifier key id does not match the key")
    return VerifierKey(name, bytes.fromhex(parts[1]), public)


def parse_verifier_keys(text: str) -> list[VerifierKey]:
    """One verifier key per non-empty line; raises VerificationError."""
    return [parse_verifier_key(line) for line in text.splitlines() if line.strip()]


def note_signature_line(name: str, key_id: bytes, signature: bytes) -> str:
    """``— <name> <base64(key id || signature)>\\n``; raises VerificationError."""
    _check_name(name)
    return f"{SIG_PREFIX}{name} {base64.b64encode(key_id + signature).decode()}\n"


def split_note(message: str) -> tuple[str, list[tuple[str, bytes, bytes]]]:
    """``(text, [(name, key id, signature)])`` of a signed note, without verifying.

    Raises VerificationError if the note is malformed: no blank line before the
    signatures, no signature, a line that is not a signature, control characters in
    the text, or more than 100 signatures.
    """
    cut = message.rfind("\n\n")
    if cut < 0 or not message.endswith("\n"):
        raise VerificationError("malformed note")
    text, sigs = message[: cut + 1], []
    if any((ch < " " and ch != "\n") or ch == "\x7f" for ch in text):
        raise VerificationError("malformed note: control character in the text")
    for line in message[cut + 2 :].splitlines():
        fields = line.removeprefix(SIG_PREFIX).split(" ")
        if not line.startswith(SIG_PREFIX) or len(fields) != 2:
            raise VerificationError("malformed note signature line")
        _check_name(fields[0])
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except binascii.Error:
            raise VerificationError("malformed note signature") from None
        if len(blob) < 5:
            raise VerificationError("malformed note signature")
        sigs.append((fields[0], blob[:4], blob[4:]))
    if not sigs or len(sigs) > MAX_NOTE_SIGNATURES:
        raise VerificationError("malformed note: no signature or too many")
    return text, sigs


def verify_note(message: str, keys: Sequence[VerifierKey]) -> list[str]:
    """The names of the trusted ``keys`` whose signatures on the note verify.

    Signatures by keys not in ``keys`` (another name or key id) are ignored. Raises
    VerificationError("signature verification failed") if a signature by a trusted key
    does not verify or if no trusted key signed, and VerificationError if the note is
    malformed.
    """
    text, sigs = split_note(message)
    data = text.encode()
    ok: list[str] = []
    for name, kid, sig in sigs:
        for k in keys:
            if k.name == name and k.key_id == kid:
                try:
                    Ed25519PublicKey.from_public_bytes(k.public_key).verify(sig, data)
                except (InvalidSignature, ValueError):
                    raise VerificationError("signature verification failed") from None
                if name not in ok:
                    ok.append(name)
    if not ok:
        raise VerificationError("signature verification failed")
    return ok


@dataclass(frozen=True)
class Checkpoint:
    """A C2SP tlog-checkpoint body: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: list[str] = field(default_factory=list)


def checkpoint_body(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    """The checkpoint text: origin, decimal size, base64 root, extensions, one per line."""
    lines = [origin, str(size), base64.b64encode(root).decode(), *extensions]
    return "".join(line + "\n" for line in lines)


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint body (a note's text); raises VerificationError if malformed."""
    lines = text[:-1].split("\n") if text.endswith("\n") else []
    if len(lines) < 3 or not lines[0] or not re.fullmatch(r"0|[1-9][0-9]{0,18}", lines[1]):
        raise VerificationError("malformed checkpoint")
    try:
        root = base64.b64decode(lines[2], validate=True)
    except binascii.Error:
        raise VerificationError("malformed checkpoint root") from None
    if len(root) != 32 or not all(lines[3:]):
        raise VerificationError("malformed checkpoint")
    return Checkpoint(lines[0], int(lines[1]), root, lines[3:])


def note_checkpoint(message: str) -> Checkpoint:
    """The checkpoint of a signed note, signatures unchecked; raises VerificationError."""
    return parse_checkpoint(split_note(message)[0])


# ---------------------------------------------------------------- proof texts


def _hash_lines(proof: Sequence[bytes]) -> str:
    return "".join(base64.b64encode(h).decode() + "\n" for h in proof)


def _parse_hashes(lines: Sequence[str]) -> list[bytes]:
    out = []
    for line in lines:
        try:
            h = base64.b64decode(line, validate=True)
        except binascii.Error:
            raise VerificationError("malformed proof hash") from None
        if len(h) != 32:
            raise VerificationError("malformed proof hash")
        out.append(h)
    return out


def _numbers(lines: Sequence[str], names: Sequence[str]) -> list[int]:
    if len(lines) != len(names):
        raise VerificationError("malformed proof: too few lines")
    out = []
    for line, name in zip(lines, names, strict=True):
        m = re.fullmatch(rf"{name} (0|[1-9][0-9]{{0,18}})", line)
        if m is None:
            raise VerificationError(f"malformed proof: expected '{name} N'")
        out.append(int(m.group(1)))
    return out


def format_inclusion_proof(index: int, proof: Sequence[bytes], checkpoint_note: str) -> str:
    """c2sp.org/tlog-proof: header, ``index N``, one base64 hash per line, a blank
    line, then the signed checkpoint note."""
    return f"{INCLUSION_HEADER}\nindex {index}\n{_hash_lines(proof)}\n{checkpoint_note}"


def parse_inclusion_proof(text: str) -> tuple[int, list[bytes], str]:
    """``(index, hashes, checkpoint note)``; an ``extra`` line is skipped. Raises
    VerificationError if malformed (the note is not verified here)."""
    head, sep, note = text.partition("\n\n")
    lines = head.split("\n")
    if not sep or lines[0] != INCLUSION_HEADER:
        raise VerificationError("malformed inclusion proof")
    if len(lines) > 1 and lines[1].startswith("extra "):
        del lines[1]
    (index,) = _numbers(lines[1:2], ["index"])
    return index, _parse_hashes(lines[2:]), note


def format_consistency_proof(size1: int, size2: int, proof: Sequence[bytes]) -> str:
    """``keyledger.dev/consistency-proof@v1``, ``old N``, ``new M``, hashes."""
    return f"{CONSISTENCY_HEADER}\nold {size1}\nnew {size2}\n{_hash_lines(proof)}"


def parse_consistency_proof(text: str) -> tuple[int, int, list[bytes]]:
    """``(size1, size2, hashes)``; raises VerificationError if malformed."""
    lines = text.removesuffix("\n").split("\n")
    if lines[0] != CONSISTENCY_HEADER:
        raise VerificationError("malformed consistency proof")
    s1, s2 = _numbers(lines[1:3], ["old", "new"])
    return s1, s2, _parse_hashes(lines[3:])


def format_range_proof(size: int, start: int, end: int, proof: Sequence[bytes]) -> str:
    """``keyledger.dev/range-proof@v1``, ``size N``, ``start a``, ``end b``, hashes."""
    return f"{RANGE_HEADER}\nsize {size}\nstart {start}\nend {end}\n{_hash_lines(proof)}"


def parse_range_proof(text: str) -> tuple[int, int, int, list[bytes]]:
    """``(size, start, end, hashes)``; raises VerificationError if malformed."""
    lines = text.removesuffix("\n").split("\n")
    if lines[0] != RANGE_HEADER:
        raise VerificationError("malformed range proof")
    size, start, end = _numbers(lines[1:4], ["size", "start", "end"])
    return size, start, end, _parse_hashes(lines[4:])


# ---------------------------------------------------------------- records

_KEY_MARK = b'"key_arn":'
_NULL_MARK = b'"key_arn":null'


def key_of_record(data: bytes) -> str | None:
    """The top-level ``key_arn`` of a stored record (canonical JSON: sorted keys,
    compact), None when it is null or absent.

    Fast path, taken when ``"key_arn":`` occurs exactly once: the value after it. That
    is sound because the ten bytes ``"key_arn":`` start with a quote that is not
    escaped can only be an object key named key_arn (a raw quote inside a string would
    end it; an escaped one makes the occurrence count twice with the real key), and
    every record the ledger writes carries the top-level key, so a single occurrence is
    that one. A record without it is not the ledger's and fails the tree check anyway.
    A string value with a backslash, or anything else, goes to ``json.loads``.
    Raises VerificationError if the record is not a JSON object or key_arn is neither
    a string nor null.
    """
    if data.count(_KEY_MARK) == 1:
        at = data.index(_KEY_MARK) + len(_KEY_MARK)
        if data.startswith(b"null", at):
            return None
        end = data.find(b'"', at + 1)
        if data[at : at + 1] == b'"' and end > 0 and data.find(b"\\", at, end) < 0:
            return data[at + 1 : end].decode()
    try:
        parsed = json.loads(data)
    except ValueError:
        raise VerificationError("record is not JSON") from None
    got = parsed.get("key_arn") if isinstance(parsed, dict) else 0
    if got is not None and not isinstance(got, str):
        raise VerificationError("record is not a JSON object with a string key_arn")
    return got


# ---------------------------------------------------------------- bundles


@dataclass
class BundleReport:
    """What ``verify_bundle`` found: one ``INVALID: ...`` line per problem."""

    problems: list[str] = field(default_factory=list)
    records_valid: int = 0
    checkpoints_valid: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return f"{self.records_valid} records valid, {self.checkpoints_valid} checkpoints valid"


class _Problems:
    def __init__(self, report: BundleReport, limit: int) -> None:
        self.report, self.limit, self.dropped = report, limit, 0

    def add(self, text: str) -> None:
        if len(self.report.problems) < self.limit:
            self.report.problems.append("INVALID: " + text)
        else:
            self.dropped += 1


_UNREADABLE = "\x00unreadable"  # the key of a record key_of_record cannot read


@dataclass
class _Cp:
    id: int
    checkpoint: Checkpoint
    signed: bool
    consistent: bool = True


@dataclass
class _Scan:
    """What the pass over records.jsonl and chain.tsv leaves behind (O(log n) + bad)."""

    last: int  # seq of the last record read
    roots: dict[int, bytes]  # full exports: the tree root at each wanted size reached
    blocks: _RangeBuilder  # the leaves, as aligned perfect subtrees
    bad: list[int]  # seqs that failed a per-record check
    seen: dict[int, tuple[str, str, bytes]]  # wanted seqs: (record hash, prev, bytes)
    forked: int = 0  # records 1..forked disagree with a checkpoint the auditor kept


def _chunks(f: BinaryIO, limit: int | None = None) -> Iterator[tuple[list[bytes], int]]:
    """The lines of ``f`` (the next ``limit`` bytes; None: to the end) without their
    b"\\n", in lists of about 1 MiB, each with the number of times ``"key_arn":``
    occurs in them."""
    tail = b""
    left = -1 if limit is None else limit
    while left and (chunk := f.read(1 << 20 if left < 0 else min(1 << 20, left))):
        left = left - len(chunk) if left > 0 else left
        buf = tail + chunk
        lines = buf.split(b"\n")
        tail = lines.pop()
        yield lines, buf.count(_KEY_MARK) - tail.count(_KEY_MARK)
    if tail:
        yield [tail], tail.count(_KEY_MARK)


class _Rows:
    """chain.tsv rows (str, without newline), handed out in the records' chunk sizes."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self._rows, self._at, self._tail = f, list[str](), 0, b""

    def take(self, n: int) -> list[str]:
        while len(self._rows) - self._at < n:
            chunk = self._f.read(1 << 20)
            if not chunk:
                if self._tail:
                    self._rows.append(self._tail.decode("utf-8", "replace"))
                    self._tail = b""
                break
            data = self._tail + chunk
            cut = data.rfind(b"\n")
            self._tail = data[cut + 1 :]
            if cut >= 0:
                new = data[:cut].decode("utf-8", "replace").split("\n")
                self._rows, self._at = self._rows[self._at :] + new, 0
        got = self._rows[self._at : self._at + n]
        self._at += len(got)
        return got


def _key_or_unreadable(data: bytes) -> str | None:
    try:
        return key_of_record(data)
    except (VerificationError, UnicodeDecodeError):
        return _UNREADABLE


def _fast_key(data: bytes) -> str | None:
    """``key_of_record`` for the scan: the same answer, the common case inlined."""
    i = data.find(_KEY_MARK)
    if i >= 0 and data.rfind(_KEY_MARK) == i:
        if data[i + 10 : i + 11] == b'"':
            j = data.find(b'"', i + 11)
            if j > 0 and data.find(b"\\", i + 11, j) < 0:
                return data[i + 11 : j].decode("utf-8", "replace")
        elif data.startswith(b"null", i + 10):
            return None
    return _key_or_unreadable(data)


_PARALLEL_MIN_BYTES = 64 << 20  # records.jsonl size from which two processes scan it


def _scan(
    directory: Path,
    first: int,
    prev: str,
    sizes: set[int],
    wanted: set[int],
    out: _Problems,
    seek: Any = None,
) -> _Scan:
    """Scan records.jsonl beside chain.tsv: per record the hash, the chain links and
    the leaf; the tree roots at ``sizes``; the ``wanted`` records kept for the SIEM
    check.

    A full export of at least ``_PARALLEL_MIN_BYTES`` on Linux with more than one CPU
    is scanned in pieces by forked processes, and the pieces are joined at each seam:
    a piece's first prev and each key's first keyPrev there must be what the pieces
    before it end with, and the tree is their blocks put together. The pieces start
    at the manifest's ``seek`` hints (several pieces per process, so that a slow one
    does not hold the rest up); a bundle without hints is scanned as two halves, the
    second starting where a line starts nearest the middle, after counting the lines
    before it. Any problem in a piece or at a seam makes it scan again in one
    process, so problems are named exactly as there. Raises OSError when a file
    cannot be read."""
    cpus = os.cpu_count() or 1
    if first == 1 and sys.platform == "linux" and cpus > 1:
        rec = directory / "records.jsonl"
        size = rec.stat().st_size
        cuts = _seek_cuts(seek, size, 3 * min(cpus, 8))
        if cuts:
            pieces = _scan_pieces(directory, cuts, prev, sizes, wanted, min(cpus, 8))
        else:
            split = _split_point(rec)
            pieces = _scan_halves(directory, split, prev, sizes, wanted) if split else None
        if pieces is not None:
            return pieces
    part = _scan_part(directory, 0, None, 0, first, prev, first == 1, sizes, wanted)
    for line in part.problems:
        out.add(line)
    return _Scan(part.last, part.roots, part.tree, part.bad, part.seen)


def _scan_halves(
    directory: Path, split: int, prev: str, sizes: set[int], wanted: set[int]
) -> _Scan | None:
    """A full export in two halves, the second from byte ``split`` in a forked
    process. Returns None when either half or the seam shows any problem: the caller
    then scans in one process, so that problems are named exactly as there."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        later = pool.submit(_scan_second_half, directory, split, sizes, wanted)
        one = _scan_part(directory, 0, split, 0, 1, prev, True, sizes, wanted)
        two = later.result()
    return _join_parts([one, two])


def _scan_pieces(
    directory: Path,
    cuts: list[tuple[int, int, int]],
    prev: str,
    sizes: set[int],
    wanted: set[int],
    workers: int,
) -> _Scan | None:
    """A full export in pieces starting at ``cuts`` (seq, records offset, chain.tsv
    offset: hints, checked at the seams), scanned by ``workers`` forked processes.
    Returns None on any problem, as ``_scan_halves``."""
    import concurrent.futures
    import multiprocessing

    starts = [(0, 0, 1), *((r, t, s) for s, r, t in cuts)]
    jobs = [
        (r, starts[i + 1][0] if i + 1 < len(starts) else None, t, s, i == 0)
        for i, (r, t, s) in enumerate(starts)
    ]
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [
            pool.submit(
                _scan_part, directory, r, r_to, t, s, prev if known else None, known, sizes, wanted
            )
            for r, r_to, t, s, known in jobs
        ]
        parts = [f.result() for f in futures]
    for part, (_, _, t, _, known) in zip(parts, jobs, strict=True):
        part.tsv_start = -1 if known else t
    return _join_parts(parts)


def _join_parts(parts: list[_Part]) -> _Scan | None:
    """Consecutive parts (the first from seq 1) joined into one scan, or None when any
    part or seam shows a problem: a part's first seq, prev, chain.tsv offset (when
    it started at a hint) and each key's first keyPrev must follow from the parts
    before it."""
    if any(p.problems or p.bad for p in parts):
        return None
    acc = parts[0]
    blocks = acc.tree.blocks
    roots = {**acc.roots}
    seen = {**acc.seen}
    heads = dict(acc.heads)
    for two in parts[1:]:
        if two.s0 != acc.last + 1 or two.prev_in != acc.prev_out:
            return None
        if two.tsv_start >= 0 and acc.tsv_end != two.tsv_start:
            return None
        for key, (_, key_seq, key_prev) in two.firsts.items():
            head = heads.get(key, (0, _ZERO_HEX))
            if (key_seq, key_prev) != (head[0] + 1, head[1]):
                return None
        for size, snap in two.snaps.items():
            roots[size] = _fold_right([b[2] for b in _join_blocks(blocks, snap)])
        blocks = _join_blocks(blocks, two.tree.blocks)
        heads.update(two.heads)
        seen.update(two.seen)
        acc = two
    tree = _RangeBuilder(0)
    tree.blocks, tree.end = blocks, acc.tree.end
    return _Scan(acc.last, roots, tree, [], seen)


def _seek_cuts(seek: Any, size: int, pieces: int) -> list[tuple[int, int, int]]:
    """Up to ``pieces - 1`` of the manifest's ``seek`` entries ``[seq, records
    offset, chain.tsv offset]``, those nearest ``size * i / pieces``, in order; none
    when the file is under ``_PARALLEL_MIN_BYTES`` or the hints are malformed or out
    of order. Hints are not trusted: ``_join_parts`` checks each at its seam."""
    if size < _PARALLEL_MIN_BYTES or not isinstance(seek, list):
        return []
    good = [
        (e[0], e[1], e[2])
        for e in seek
        if isinstance(e, list) and len(e) == 3 and all(type(v) is int for v in e)
    ]
    if len(good) != len(seek) or not good:
        return []
    for (s1, r1, t1), (s2, r2, t2) in itertools.pairwise([(1, 0, 0), *good, (0, size, 0)]):
        if not (s1 < s2 or s2 == 0) or not r1 < r2 or (t2 and not t1 < t2):
            return []
    chosen = {min(good, key=lambda e: abs(e[1] * pieces - size * i)) for i in range(1, pieces)}
    return sorted(chosen)


def _split_point(rec: Path, min_bytes: int | None = None) -> int | None:
    """The byte offset of the record line that starts nearest the middle of ``rec``,
    or None when the file is smaller than ``min_bytes`` (``_PARALLEL_MIN_BYTES``)."""
    size = rec.stat().st_size
    if size < (_PARALLEL_MIN_BYTES if min_bytes is None else min_bytes):
        return None
    with rec.open("rb") as f:
        f.seek(size // 2)
        while chunk := f.read(1 << 16):
            if (i := chunk.find(b"\n")) >= 0:
                at = f.tell() - len(chunk) + i + 1
                return at if at < size else None
    return None


def _line_offset(path: Path, lines: int) -> int:
    """The byte offset just after the first ``lines`` newlines of ``path`` (its size
    when it has fewer)."""
    pos = 0
    with path.open("rb") as f:
        while lines and (chunk := f.read(1 << 20)):
            n = chunk.count(b"\n")
            if n < lines:
                lines, pos = lines - n, pos + len(chunk)
                continue
            i = -1
            for _ in range(lines):
                i = chunk.find(b"\n", i + 1)
            return pos + i + 1
    return pos if not lines else path.stat().st_size


def _scan_second_half(directory: Path, split: int, sizes: set[int], wanted: set[int]) -> _Part:
    """In the forked process: the records from byte ``split`` to the end."""
    with (directory / "records.jsonl").open("rb") as f:
        before, left = 0, split
        while left and (chunk := f.read(min(1 << 20, left))):
            before, left = before + chunk.count(b"\n"), left - len(chunk)
    tsv_at = _line_offset(directory / "chain.tsv", before)
    return _scan_part(directory, split, None, tsv_at, before + 1, None, False, sizes, wanted)


@dataclass
class _Part:
    """What scanning one stretch of records leaves behind."""

    s0: int  # seq of its first record
    prev_in: str  # the prev hash its first record had to name
    known: bool  # whether every key's earlier records were seen (False: take the claims)
    prev_out: str = ""  # the prev hash a next record must name
    last: int = 0
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (keySeq, hash)
    firsts: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # unknown keys'
    # first record here: key -> (seq, claimed keySeq, claimed keyPrev)
    roots: dict[int, bytes] = field(default_factory=dict)  # known: tree root at sizes
    snaps: dict[int, list[tuple[int, int, bytes]]] = field(default_factory=dict)  # else
    tree: _RangeBuilder = field(default_factory=lambda: _RangeBuilder(0))
    bad: list[int] = field(default_factory=list)
    seen: dict[int, tuple[str, str, bytes]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    misaligned: bool = False
    tsv_end: int = 0  # chain.tsv offset after the rows read (-1: not known exactly)
    tsv_start: int = -1  # chain.tsv offset it started at, when a hint (to check)


def _scan_part(
    directory: Path,
    rec_from: int,
    rec_to: int | None,
    tsv_from: int,
    s0: int,
    prev: str | None,
    known: bool,
    sizes: set[int],
    wanted: set[int],
) -> _Part:
    """Records from byte ``rec_from`` to ``rec_to`` (None: the end) beside chain.tsv
    from byte ``tsv_from``, the first being seq ``s0``. ``prev``: the prev hash the
    first row must name (None: whatever it names). ``known``: every key's earlier
    records are in this part (else a key's first row here is taken at its word and
    listed in ``firsts``).

    Fast path: a chunk's record hashes, then its chain.tsv rows checked column by
    column (``_chunk_ok``), then its leaf hashes into the tree a level at a time. A
    chunk that fails goes record by record through ``_slow_chunk``, which names each
    bad record."""
    sha = _sha256
    tree = _RangeBuilder(s0 - 1)
    cuts = sorted(sizes)
    with (directory / "records.jsonl").open("rb") as rf, (directory / "chain.tsv").open("rb") as tf:
        rf.seek(rec_from)
        tf.seek(tsv_from)
        tsv = _Rows(tf)
        part: _Part | None = None
        seq = s0 - 1
        for lines, marks in _chunks(rf, None if rec_to is None else rec_to - rec_from):
            rows = tsv.take(len(lines))
            rows += [""] * (len(lines) - len(rows))
            if part is None:
                f = rows[0].split("\t") if rows else []
                claimed = f[2] if len(f) == 6 else ""
                part = _Part(s0, claimed if prev is None else prev, known, tree=tree)
                part.prev_out, part.tsv_end = part.prev_in, tsv_from
                part.roots = {0: EMPTY_ROOT} if known and s0 == 1 else {}
            first = seq + 1
            rhs = [sha(d).hexdigest() for d in lines]
            new = _chunk_ok(lines, marks, rows, rhs, first, part)
            if new is not None:
                part.heads.update(new)
                for i in range(len(lines)) if wanted else ():
                    if first + i in wanted:
                        part.seen[first + i] = (
                            rhs[i],
                            rhs[i - 1] if i else part.prev_out,
                            lines[i],
                        )
                part.prev_out, part.misaligned = rhs[-1] if rhs else part.prev_out, False
                leaves = _leaf_hashes(lines)
                at, end = first - 1, first - 1 + len(lines)
                for cut in [c for c in cuts if at < c <= end]:
                    tree.extend(leaves[at - first + 1 : cut - first + 1])
                    _at_size(part, cut)
                    at = cut
                tree.extend(leaves[at - first + 1 :])
            else:
                _slow_chunk(lines, rows, first, part, sizes, wanted)
                exact = part.tsv_end >= 0 and not any("\ufffd" in r for r in rows)
                part.tsv_end = (
                    part.tsv_end + sum(len(r.encode()) + 1 for r in rows) if exact else -1
                )
            seq = first + len(lines) - 1
        if part is None:
            part = _Part(s0, prev or "", known, prev_out=prev or "", tree=tree)
            part.roots = {0: EMPTY_ROOT} if known and s0 == 1 else {}
        part.last = seq
        if rec_to is None and tsv.take(1):
            part.problems.append(f"chain break at seq {seq + 1} (chain.tsv lists more records)")
    return part


_LEAF_PREFIX = _sha256(b"\x00")


def _leaf_hashes(lines: list[bytes]) -> list[bytes]:
    """RFC 9162 leaf hashes H(0x00 || line), from a copy of the hashed prefix (no
    concatenation of each line)."""
    out: list[bytes] = []
    fresh = _LEAF_PREFIX.copy
    add = out.append
    for d in lines:
        h = fresh()
        h.update(d)
        add(h.digest())
    return out


def _at_size(part: _Part, size: int) -> None:
    if part.known:
        part.roots[size] = part.tree.root()
    else:
        part.snaps[size] = list(part.tree.blocks)


def _join_blocks(
    left: Sequence[tuple[int, int, bytes]], right: Sequence[tuple[int, int, bytes]]
) -> list[tuple[int, int, bytes]]:
    """The maximal aligned subtrees of two adjacent ranges' blocks put together."""
    out = list(left)
    for level, index, digest in right:
        while index & 1 and out and out[-1][0] == level and out[-1][1] == index - 1:
            digest = node_hash(out.pop()[2], digest)
            level, index = level + 1, index >> 1
        out.append((level, index, digest))
    return out


class _Needles(dict[str, bytes]):
    """key -> the bytes ``"key_arn":"KEY"`` that confirm it in a record."""

    def __missing__(self, key: str) -> bytes:
        needle = _NULL_MARK if key == "-" else b'"key_arn":"' + key.encode() + b'"'
        if len(self) < 100_000:
            self[key] = needle
        return needle


_NEEDLES = _Needles()


def _chunk_ok(
    lines: list[bytes], marks: int, rows: list[str], rhs: list[str], s0: int, part: _Part
) -> dict[str, tuple[int, str]] | None:
    """Whether every chain.tsv row of a chunk is exactly the row its record implies
    (what ``_slow_chunk`` checks one by one), column by column: the key heads the
    chunk leaves behind, or None when anything differs.

    A record's key is taken from its row and confirmed in the record: the row's key
    (no quote or backslash in it) occurs as ``"key_arn":"KEY"`` (``"key_arn":null``
    for ``-``), and ``"key_arn":`` occurs once per record (``marks``), so it is what
    ``key_of_record`` returns."""
    n = len(lines)
    text = "\t".join(rows)
    flat = text.split("\t")
    if marks != n or len(flat) != 6 * n or not n:
        return None
    if flat[1::6] != rhs or flat[2::6] != [part.prev_out, *rhs[:-1]]:
        return None
    if flat[0::6] != list(map(str, range(s0, s0 + n))):
        return None
    keys = flat[3::6]
    joined = "".join(keys)
    if '"' in joined or "\\" in joined:
        return None
    if not all(map(bytes.__contains__, lines, map(_NEEDLES.__getitem__, keys))):
        return None
    new: dict[str, tuple[int, str]] = {}
    firsts: dict[str, tuple[int, int, str]] = {}
    kseqs: list[str] = []
    kprevs: list[str] = []
    heads, zero = part.heads, (0, _ZERO_HEX)
    for k, rh, i in zip(keys, rhs, range(n), strict=True):
        if k == "-":
            kseqs.append("-")
            kprevs.append("-")
            continue
        h = new.get(k) or heads.get(k)
        if h is None:
            if part.known:
                h = zero
            else:  # the key's earlier records are not here: take the row's claim
                claim = flat[6 * i + 4 : 6 * i + 6]
                if not _claim_ok(claim[0], claim[1]):
                    return None
                h = (int(claim[0]) - 1, claim[1])
                firsts[k] = (s0 + i, h[0] + 1, h[1])
        kseqs.append(str(h[0] + 1))
        kprevs.append(h[1])
        new[k] = (h[0] + 1, rh)
    if flat[4::6] != kseqs or flat[5::6] != kprevs:
        return None
    part.firsts.update(firsts)
    if part.tsv_end >= 0:  # each row and its newline: one byte per character if ASCII
        part.tsv_end = part.tsv_end + len(text) + 1 if text.isascii() else -1
    return new


def _slow_chunk(
    lines: list[bytes], rows: list[str], s0: int, part: _Part, sizes: set[int], wanted: set[int]
) -> None:
    """One chunk record by record, naming each bad record in ``part.problems``."""
    sha, zero_hex, heads, prev = _sha256, _ZERO_HEX, part.heads, part.prev_out
    out = _ListProblems(part.problems)
    for pos, data in enumerate(lines):
        seq = s0 + pos
        rh = sha(data).hexdigest()
        key = _fast_key(data)
        row = rows[pos]
        head = None if key is None else heads.get(key, (0, zero_hex) if part.known else None)
        if key is None:
            ok = row == f"{seq}\t{rh}\t{prev}\t-\t-\t-"
        elif head is not None:
            ok = row == f"{seq}\t{rh}\t{prev}\t{key}\t{head[0] + 1}\t{head[1]}"
        else:  # the key's earlier records are not here
            ok = _first_of_key_ok(row, f"{seq}\t{rh}\t{prev}\t{key}\t")
        if seq in wanted:
            part.seen[seq] = (rh, prev, data)
        if ok:
            part.misaligned = False
            if key is not None:
                if head is None:
                    f = row.split("\t")
                    part.firsts[key] = (seq, int(f[4]), f[5])
                heads[key] = (head[0] + 1 if head else int(row.split("\t")[4]), rh)
            prev = rh
        else:
            part.misaligned = _diagnose(
                seq, rh, prev, key, head, lines, rows, pos, part.misaligned, out
            )
            part.bad.append(seq)
            prev = _follow_claims(row, rh, heads)
        part.tree.append(sha(b"\x00" + data).digest())
        if seq in sizes:
            _at_size(part, seq)
    part.prev_out = prev


class _ListProblems:
    """``_Problems.add`` into a plain list (a part's problems, capped when reported)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def add(self, text: str) -> None:
        if len(self.lines) < 10_000:
            self.lines.append(text)


def _first_of_key_ok(row: str, prefix: str) -> bool:
    rest = row[len(prefix) :].split("\t") if row.startswith(prefix) else []
    return len(rest) == 2 and _claim_ok(rest[0], rest[1])


def _claim_ok(key_seq: str, key_prev: str) -> bool:
    """A key's first row in a stretch that starts after its earlier records: any
    keySeq from 1 and any hash (the seam or the range proof checks them)."""
    return (
        key_seq.isdigit()
        and int(key_seq) >= 1
        and re.fullmatch(r"[0-9a-f]{64}", key_prev) is not None
    )


def _follow_claims(row: str, rh: str, heads: dict[str, tuple[int, str]]) -> str:
    """After a bad record, follow chain.tsv's own claims so that only this record is
    reported: returns the prev hash the next row must name."""
    f = row.split("\t")
    claimed = f[1] if len(f) == 6 and re.fullmatch(r"[0-9a-f]{64}", f[1]) else rh
    if len(f) == 6 and f[3] != "-" and f[4].isdigit():
        heads[f[3]] = (int(f[4]), claimed)
    return claimed


def _diagnose(
    seq: int,
    rh: str,
    prev: str,
    key: str | None,
    head: tuple[int, str] | None,
    lines: Sequence[bytes],
    rows: Sequence[str],
    pos: int,
    misaligned: bool,
    out: _ListProblems,
) -> bool:
    """Name what is wrong with the record at ``seq`` whose chain.tsv row differs from
    the one it implies. Returns whether the records and rows are out of step (then the
    next out-of-step record is not reported again)."""
    f = rows[pos].split("\t")
    if len(f) != 6 or f[0] != str(seq):
        if not misaligned:
            out.add(f"chain break at seq {seq} (records missing or reordered)")
        return True
    if f[1] != rh:
        near = {
            r.split("\t")[1] for r in [*rows[pos - 1 : pos], *rows[pos + 1 : pos + 2]] if "\t" in r
        }
        nxt = lines[pos + 1 : pos + 2]
        if rh in near or (nxt and _sha256(nxt[0]).hexdigest() == f[1]):
            if not misaligned:
                out.add(f"chain break at seq {seq} (records missing or reordered)")
            return True
        out.add(f"record hash mismatch at seq {seq} (record modified)")
    if f[2] != prev:
        out.add(f"chain break at seq {seq}")
    if key != _UNREADABLE:
        claimed_key = None if f[3] == "-" else f[3]
        if key is None:
            good = claimed_key is None and f[4] == f[5] == "-"
        elif head is None:
            good = claimed_key == key and _first_of_key_ok(rows[pos], "\t".join(f[:4]) + "\t")
        else:
            good = claimed_key == key and (f[4], f[5]) == (str(head[0] + 1), head[1])
        if not good:
            out.add(f"key chain break at seq {seq} (key {key or claimed_key})")
    else:
        out.add(f"record at seq {seq} is not a JSON object with a key_arn")
    return False


def _read_manifest(directory: Path, out: _Problems) -> dict[str, Any] | None:
    try:
        m = json.loads((directory / "manifest.json").read_bytes())
    except (OSError, ValueError):
        out.add("manifest.json is missing or unreadable")
        return None
    ok = (
        isinstance(m, dict)
        and m.get("format") == BUNDLE_FORMAT
        and isinstance(m.get("ledger"), str)
        and isinstance(m.get("origin"), str)
        and isinstance(m.get("fromSeq"), int)
        and isinstance(m.get("toSeq"), int)
        and 1 <= m["fromSeq"] <= m["toSeq"] + 1
        and isinstance(m.get("prevHash"), str)
        and re.fullmatch(r"[0-9a-f]{64}", m["prevHash"]) is not None
        and isinstance(m.get("files"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in m["files"].items())
    )
    if not ok:
        out.add(f"manifest.json is not a {BUNDLE_FORMAT} manifest")
        return None
    manifest: dict[str, Any] = m
    return manifest


def _check_files(directory: Path, files: dict[str, str], out: _Problems) -> None:
    """Every listed file is there and, but for the two the scan checks line by line
    (a whole-file hash would be a third pass over every record's bytes), unchanged."""
    for name, want in sorted(files.items()):
        path = directory / name
        if ".." in Path(name).parts or not path.is_file():
            out.add(f"file {name} is missing")
            continue
        if name in ("records.jsonl", "chain.tsv"):
            continue
        h = _sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != want:
            out.add(f"file {name} was modified")


def _load_checkpoints(
    directory: Path, names: Iterable[str], origin: str, keys: Sequence[VerifierKey], out: _Problems
) -> list[_Cp | None]:
    """The listed checkpoints in id order; None for one that is missing or malformed."""
    cps: list[_Cp | None] = []
    for name in sorted(n for n in names if re.fullmatch(r"checkpoints/\d{8}\.txt", n)):
        cp_id = int(name[12:20])
        try:
            note = (directory / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            cps.append(None)  # reported as a missing or modified file
            continue
        try:
            cp = note_checkpoint(note)
        except VerificationError:
            out.add(f"checkpoint {cp_id}: malformed")
            cps.append(None)
            continue
        if cp.origin != origin:
            out.add(f"checkpoint {cp_id} (size {cp.size}): malformed (origin {cp.origin!r})")
            cps.append(None)
            continue
        try:
            verify_note(note, keys)
            signed = True
        except VerificationError:
            out.add(f"checkpoint {cp_id} (size {cp.size}): signature verification failed")
            signed = False
        cps.append(_Cp(cp_id, cp, signed))
    return cps


def _check_consistency(directory: Path, cps: Sequence[_Cp | None], out: _Problems) -> None:
    """Each pair of consecutive signed checkpoints must be consistent."""
    for a, b in itertools.pairwise(cps):
        if a is None or b is None or not (a.signed and b.signed):
            continue
        s1, s2 = a.checkpoint.size, b.checkpoint.size
        try:
            if s1 >= s2:
                verify_consistency(s1, s2, [], a.checkpoint.root, b.checkpoint.root)
            else:
                name = f"proofs/consistency-{a.id:08d}-{b.id:08d}.txt"
                p1, p2, proof = parse_consistency_proof((directory / name).read_text())
                if (p1, p2) != (s1, s2):
                    raise VerificationError("proof of other sizes")
                verify_consistency(s1, s2, proof, a.checkpoint.root, b.checkpoint.root)
        except (VerificationError, OSError, UnicodeDecodeError):
            out.add(
                f"checkpoint {b.id} (size {s2}) is inconsistent with checkpoint {a.id} of size {s1}"
            )
            b.consistent = False


def _range_ok(directory: Path, cp: _Cp, first: int, last: int, scan: _Scan) -> bool:
    size = cp.checkpoint.size
    try:
        text = (directory / f"proofs/range-{cp.id:08d}.txt").read_text()
        got = parse_range_proof(text)
        if got[:3] != (size, first - 1, last) or scan.blocks.end != last:
            return False
        return _range_root(size, first - 1, last, scan.blocks.blocks, got[3]) == cp.checkpoint.root
    except (VerificationError, OSError, UnicodeDecodeError):
        return False


def _check_roots(
    directory: Path,
    cps: Sequence[_Cp],
    kept: Sequence[Checkpoint],
    scan: _Scan,
    first: int,
    last: int,
    out: _Problems,
) -> tuple[int, int]:
    """Checkpoints against the records: ``(valid checkpoints, last covered seq)``."""
    valid, covered = 0, first - 1 if first > 1 else 0
    for cp in cps:
        size, root = cp.checkpoint.size, cp.checkpoint.root
        if first == 1 and size > scan.last:
            out.add(
                f"log truncated: checkpoint {cp.id} covers {size} records, "
                f"the bundle ends at seq {scan.last}"
            )
            continue
        if first == 1:
            matches = scan.roots.get(size) == root
        else:
            matches = size < last or _range_ok(directory, cp, first, last, scan)
        if not matches:
            out.add(f"records do not match checkpoint {cp.id} of size {size}")
        elif cp.signed and cp.consistent:
            valid += 1
            if first == 1 or size >= last:
                covered = max(covered, min(size, last))
    for k in kept:
        if first == 1 and k.size > scan.last:
            out.add(f"log truncated: a kept checkpoint covers {k.size} records")
            covered = 0
        elif first == 1 and scan.roots.get(k.size) != k.root:
            out.add(f"records do not match the kept checkpoint of size {k.size}")
            scan.forked = max(scan.forked, k.size)
    return valid, covered


def _read_siem(path: Path) -> list[tuple[int, Any]]:
    """The SIEM copy's JSON lines ``(line number, value)``; raises OSError."""
    copies: list[tuple[int, Any]] = []
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    copies.append((n, json.loads(line)))
                except ValueError:
                    copies.append((n, None))
    return copies


def _check_siem(
    copies: Sequence[tuple[int, Any]],
    seen: dict[int, tuple[str, str, bytes]],
    ledger_id: str,
    derive_view: Callable[[dict[str, Any], int, bytes, bytes, str], Any] | None,
    out: _Problems,
) -> None:
    for n, copy in copies:
        seq = copy.get("seq") if isinstance(copy, dict) else None
        if not isinstance(seq, int):
            seq = None
        got = None if seq is None else seen.get(seq)
        same = (
            got is not None
            and isinstance(copy, dict)
            and copy.get("ledger") == ledger_id
            and copy.get("recordHash") == got[0]
            and copy.get("prev") == got[1]
        )
        if same and seq is not None and got and isinstance(copy, dict) and derive_view:
            try:
                view = derive_view(
                    json.loads(got[2]), seq, bytes.fromhex(got[0]), bytes.fromhex(got[1]), ledger_id
                )
                same = copy.get("record") == view["record"]
            except (ValueError, KeyError, TypeError):
                same = False
        if not same:
            out.add(f"SIEM copy at seq {seq} differs from the stored event (line {n})")


def verify_bundle(
    directory: Path,
    keys: Sequence[VerifierKey],
    *,
    siem_copy: Path | None = None,
    derive_view: Callable[[dict[str, Any], int, bytes, bytes, str], Any] | None = None,
    kept_checkpoints: Sequence[str] = (),
    max_problems: int = 100,
) -> BundleReport:
    """Verify the export bundle in ``directory`` (layout: ``ledger.bundle``) against the
    trusted ``keys``.

    ``siem_copy``: published records (JSON lines ``{ledger, seq, recordHash, prev,
    record}``) to compare with the bundle; ``derive_view(event, seq, record_hash, prev,
    ledger_id)`` rebuilds the published value of a stored event so that ``record`` is
    compared too (without it only the envelope is). ``kept_checkpoints``: signed notes
    the auditor saved earlier; the records must match each.

    Tampering never raises: every problem is an ``INVALID: ...`` line of the report
    (at most ``max_problems``, then a count). Raises VerificationError only when
    ``directory`` is not a readable directory.
    """
    if not directory.is_dir():
        raise VerificationError(f"{directory} is not a readable directory")
    report = BundleReport()
    out = _Problems(report, max_problems)
    manifest = _read_manifest(directory, out)
    if manifest is not None:
        _verify(directory, manifest, keys, siem_copy, derive_view, kept_checkpoints, report, out)
    if out.dropped:
        report.problems.append(f"INVALID: ... and {out.dropped} more problems")
    return report


def _verify(
    directory: Path,
    manifest: dict[str, Any],
    keys: Sequence[VerifierKey],
    siem_copy: Path | None,
    derive_view: Callable[[dict[str, Any], int, bytes, bytes, str], Any] | None,
    kept_notes: Sequence[str],
    report: BundleReport,
    out: _Problems,
) -> None:
    first, last, prev = manifest["fromSeq"], manifest["toSeq"], manifest["prevHash"]
    if first == 1 and prev != ZERO.hex():
        out.add("chain break at seq 1 (prevHash of a full export must be zeros)")
    files: dict[str, str] = manifest["files"]
    _check_files(directory, files, out)
    listed = _load_checkpoints(directory, files, manifest["origin"], keys, out)
    _check_consistency(directory, listed, out)
    cps = [cp for cp in listed if cp is not None]
    kept: list[Checkpoint] = []
    for note in kept_notes:
        try:
            verify_note(note, keys)
            kept.append(note_checkpoint(note))
        except VerificationError as err:
            out.add(f"kept checkpoint: {err}")
    copies = _read_siem(siem_copy) if siem_copy is not None else []
    wanted = {c["seq"] for _, c in copies if isinstance(c, dict) and isinstance(c.get("seq"), int)}
    sizes = {cp.checkpoint.size for cp in cps} | {k.size for k in kept}
    try:
        scan = _scan(directory, first, prev, sizes, wanted, out, manifest.get("seek"))
    except OSError as err:
        out.add(f"records cannot be read ({err.strerror or err})")
        scan = _Scan(first - 1, {}, _RangeBuilder(first - 1), [], {})
    if scan.last != last:
        out.add(f"records.jsonl ends at seq {scan.last}, the manifest says toSeq {last}")
    report.checkpoints_valid, covered = _check_roots(directory, cps, kept, scan, first, last, out)
    if covered < last:
        verified = max((c.checkpoint.size for c in cps if c.signed and c.consistent), default=0)
        out.add(
            f"records after seq {min(covered, verified) if first == 1 else covered} "
            "are not covered by any signed checkpoint"
        )
    upto = min(covered, scan.last)
    start = max(first, scan.forked + 1)  # a kept checkpoint that fails voids its prefix
    bad = sum(1 for s in scan.bad if start <= s <= upto)
    report.records_valid = max(0, upto - start + 1 - bad)
    if copies:
        _check_siem(copies, scan.seen, manifest["ledger"], derive_view, out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ledger.offline_verify --bundle DIR --public-key FILE [--siem-copy
    FILE]``: prints each problem, then the summary; 0 if the bundle is valid, 1 if not,
    2 if the bundle or key file cannot be read."""
    p = argparse.ArgumentParser(description="Verify a KeyLedger audit bundle offline.")
    p.add_argument("--bundle", required=True, type=Path, help="the bundle directory")
    p.add_argument("--public-key", required=True, type=Path, help="trusted vkey lines")
    p.add_argument("--siem-copy", type=Path, help="published records (JSON lines)")
    p.add_argument("--checkpoint", type=Path, action="append", default=[], help="kept note")
    a = p.parse_args(argv)
    try:
        keys = parse_verifier_keys(a.public_key.read_text(encoding="utf-8"))
        kept = [c.read_text(encoding="utf-8") for c in a.checkpoint]
        report = verify_bundle(a.bundle, keys, siem_copy=a.siem_copy, kept_checkpoints=kept)
    except (VerificationError, OSError, UnicodeDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in report.problems:
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
