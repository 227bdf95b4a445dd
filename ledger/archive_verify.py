"""The archive validator: checks a CloudTrail-layout archive of the audit stream with
nothing but the archive directory and the ledger's public key, and reports like
``aws cloudtrail validate-logs``.

This module imports only the Python standard library, ``cryptography`` and
``ledger.offline_verify`` (itself standard library and ``cryptography``), so an
auditor can run it alone::

    python -m ledger.archive_verify DIR --public-key ledger.vkey

The archive (written by ``consumers.archive``; ``DIR`` stands for the S3 bucket):

* Log files, gzip JSON ``{"Records": [...]}`` holding the bare CloudTrail records::

    AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/
        <account>_CloudTrail_<region>_<YYYYMMDDTHHmmZ>_<first>-<last>.json.gz

  account = ``recipientAccountId``, region = ``awsRegion``. Each file belongs to the
  UTC hour of its name's time. ``<first>-<last>`` is the ``seq`` range of the write
  that produced the file: the files of one write (one per account and region) share
  it and together hold exactly those seqs.
* Beside each log file, its index ``<same name>.index.json``:
  ``{"ledger": <id>, "records": [[seq, recordHash], ...]}`` in the order of
  ``Records``, so every record maps back to its ledger proof. Records themselves are
  unaltered. The validator checks each ``eventID`` against the one the ledger derives
  from ``(ledger, seq)``, which ties the index's seqs to the signed log file.
* One digest file per hour and (account, region), every hour from the first one on,
  also for hours without log files (as AWS), in AWS's digest format::

    AWSLogs/<account>/CloudTrail-Digest/<region>/YYYY/MM/DD/
        <account>_CloudTrail-Digest_<region>_<trail>_<region>_<YYYYMMDDTHHmmssZ>.json.gz

  named after its ``digestEndTime`` (the end of the hour). It lists the log files of
  its hour with ``hashValue`` = SHA-256 of the uncompressed log file, as AWS does, and
  chains to the previous hour's digest by ``previousDigestHashValue`` (SHA-256 of the
  uncompressed previous digest) and ``previousDigestSignature``.
* Where AWS keeps a digest's signature in S3 object metadata, ``<digest>.sig`` holds
  it: ``{"signature": <hex>, "signature-algorithm": "Ed25519"}``. The signature is
  Ed25519 (the ledger's HSM key) over AWS's string to sign: ``digestEndTime``,
  ``<bucket>/<digest object>``, the hex SHA-256 of the uncompressed digest, and the
  previous digest's signature (``null`` for the first), joined by newlines.
  ``digestPublicKeyFingerprint`` is the hex SHA-256 of the raw 32-byte public key.

What a validation finds (each problem one line, AWS's wording where AWS has one):
a modified, deleted or unreadable log file or digest, a bad or missing signature, a
digest not linked to the one before it (reordered, replaced or skipped), a missing
digest in the middle of the chain or before newer log files, log files no valid
digest covers, records (by ``seq``) in no valid log file, and a ``seq`` in two files.

Security caveat: like AWS, deleting the newest digest together with, or instead of,
the newest log files cannot be told apart offline from a writer that has not yet
sealed that hour; the log files of the hour are then reported as not yet covered.
Compare the last archived ``seq`` with a signed checkpoint to close that gap.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import re
import sys
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.offline_verify import VerificationError, VerifierKey, parse_verifier_keys

HOUR = timedelta(hours=1)
HASH_ALGORITHM = "SHA-256"
SIGNATURE_ALGORITHM = "Ed25519"
DEFAULT_BUCKET = "keyledger-archive"
INDEX_SUFFIX = ".index.json"
SIGNATURE_SUFFIX = ".sig"
DISPLAY_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# The ledger's eventID namespace: uuid5(NAMESPACE_URL, "urn:keyledger:cloudtrail-event-id").
EVENT_ID_NAMESPACE = uuid.UUID("6d07731b-8899-55dc-ace0-095a9d62eeab")

_LOG_RE = re.compile(
    r"AWSLogs/(?P<a>\d{12})/CloudTrail/(?P<r>[a-z0-9-]+)/(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/"
    r"(?P=a)_CloudTrail_(?P=r)_(?P<t>\d{8}T\d{4}Z)_(?P<first>\d+)-(?P<last>\d+)\.json\.gz"
)
_DIGEST_RE = re.compile(
    r"AWSLogs/(?P<a>\d{12})/CloudTrail-Digest/(?P<r>[a-z0-9-]+)/"
    r"(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/"
    r"(?P=a)_CloudTrail-Digest_(?P=r)_(?P<trail>[A-Za-z0-9._-]+)_(?P=r)_(?P<t>\d{8}T\d{6}Z)"
    r"\.json\.gz"
)


# ---------------------------------------------------------------- names and formats


def format_time(when: datetime) -> str:
    """RFC 3339 UTC with ``Z`` and whole seconds, as CloudTrail writes times."""
    return when.astimezone(UTC).strftime(DISPLAY_FORMAT)


def parse_time(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time; without an offset it is taken as UTC (as the AWS
    CLI does). Raises ValueError if ``text`` is not a time."""
    parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def hour_of(when: datetime) -> datetime:
    """The start of the UTC hour holding ``when``."""
    return when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def log_object(account: str, region: str, stamp: datetime, first: int, last: int) -> str:
    """The object key of a log file written at ``stamp`` for seqs ``first..last``."""
    s = stamp.astimezone(UTC)
    return (
        f"AWSLogs/{account}/CloudTrail/{region}/{s:%Y/%m/%d}/"
        f"{account}_CloudTrail_{region}_{s:%Y%m%dT%H%MZ}_{first}-{last}.json.gz"
    )


def index_object(log_key: str) -> str:
    """The object key of a log file's seq index."""
    return log_key.removesuffix(".json.gz") + INDEX_SUFFIX


def digest_object(account: str, region: str, trail: str, end: datetime) -> str:
    """The object key of the digest of the hour that ends at ``end``."""
    e = end.astimezone(UTC)
    return (
        f"AWSLogs/{account}/CloudTrail-Digest/{region}/{e:%Y/%m/%d}/"
        f"{account}_CloudTrail-Digest_{region}_{trail}_{region}_{e:%Y%m%dT%H%M%SZ}.json.gz"
    )


def signature_object(digest_key: str) -> str:
    """The object key of the sidecar holding a digest's signature (AWS: S3 metadata)."""
    return digest_key + SIGNATURE_SUFFIX


def key_fingerprint(public_key: bytes) -> str:
    """``digestPublicKeyFingerprint``: hex SHA-256 of the raw Ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()


def signing_string(digest: Mapping[str, Any], inflated: bytes) -> bytes:
    """AWS's digest string to sign, over the uncompressed digest bytes ``inflated``.

    Raises KeyError if the digest lacks a field the string needs.
    """
    previous = digest["previousDigestSignature"]
    return "\n".join(
        (
            str(digest["digestEndTime"]),
            f"{digest['digestS3Bucket']}/{digest['digestS3Object']}",
            hashlib.sha256(inflated).hexdigest(),
            "null" if previous is None else str(previous),
        )
    ).encode()


def event_id(ledger_id: str, seq: int) -> str:
    """The deterministic CloudTrail ``eventID`` of the record at ``seq`` of a ledger
    (``consumers.cloudtrail`` uses this one)."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{ledger_id}:{seq}"))


@dataclass(frozen=True)
class LogName:
    """A log file's object key, parsed."""

    key: str
    account: str
    region: str
    stamp: datetime
    first: int
    last: int

    @property
    def hour(self) -> datetime:
        return hour_of(self.stamp)

    @property
    def chain(self) -> tuple[str, str]:
        return (self.account, self.region)


@dataclass(frozen=True)
class DigestName:
    """A digest file's object key, parsed."""

    key: str
    account: str
    region: str
    trail: str
    end: datetime

    @property
    def chain(self) -> tuple[str, str]:
        return (self.account, self.region)


def _folder_matches(m: re.Match[str], when: datetime) -> bool:
    return (m["y"], m["m"], m["d"]) == (f"{when:%Y}", f"{when:%m}", f"{when:%d}")


def parse_log_object(key: str) -> LogName | None:
    """The parts of a log file key, or None if ``key`` is not one (or its date folder
    disagrees with its name)."""
    m = _LOG_RE.fullmatch(key)
    if m is None:
        return None
    stamp = datetime.strptime(m["t"], "%Y%m%dT%H%MZ").replace(tzinfo=UTC)
    if not _folder_matches(m, stamp) or int(m["first"]) > int(m["last"]):
        return None
    return LogName(key, m["a"], m["r"], stamp, int(m["first"]), int(m["last"]))


def parse_digest_object(key: str) -> DigestName | None:
    """The parts of a digest key, or None if ``key`` is not one."""
    m = _DIGEST_RE.fullmatch(key)
    if m is None:
        return None
    end = datetime.strptime(m["t"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if not _folder_matches(m, end):
        return None
    return DigestName(key, m["a"], m["r"], m["trail"], end)


def scan_archive(root: Path) -> tuple[list[LogName], list[DigestName]]:
    """Every log file and digest under ``root/AWSLogs``, sorted by time then key.

    Other files (indexes, signatures, temporary files) are not listed. Raises OSError
    if the tree cannot be read.
    """
    logs: list[LogName] = []
    digests: list[DigestName] = []
    base = root / "AWSLogs"
    if base.is_dir():
        for path in base.rglob("*.json.gz"):
            key = path.relative_to(root).as_posix()
            if (log := parse_log_object(key)) is not None:
                logs.append(log)
            elif (digest := parse_digest_object(key)) is not None:
                digests.append(digest)
    logs.sort(key=lambda n: (n.stamp, n.first, n.key))
    digests.sort(key=lambda n: (n.end, n.key))
    return logs, digests


def read_index(path: Path) -> tuple[str, list[tuple[int, str]]]:
    """``(ledger id, [(seq, recordHash), ...])`` of an index file.

    Raises OSError if it cannot be read, ValueError if it is malformed.
    """
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict) or not isinstance(data.get("ledger"), str):
        raise ValueError("index has no ledger")
    rows = data.get("records")
    if not isinstance(rows, list):
        raise ValueError("index has no records")
    out: list[tuple[int, str]] = []
    for row in rows:
        if (
            not isinstance(row, list)
            or len(row) != 2
            or type(row[0]) is not int
            or not isinstance(row[1], str)
        ):
            raise ValueError("malformed index row")
        out.append((row[0], row[1]))
    return data["ledger"], out


# ---------------------------------------------------------------- validation


@dataclass
class ArchiveReport:
    """What ``validate_archive`` found.

    ``problems`` are AWS-style lines (``Digest file<TAB>s3://...<TAB>INVALID: ...``);
    ``valid`` lists what validated (for ``--verbose``); ``pending`` lists log files
    newer than every digest (not yet sealed: neither valid nor invalid).
    """

    requested_start: datetime
    requested_end: datetime
    found_start: datetime | None = None
    found_end: datetime | None = None
    problems: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    valid_digests: int = 0
    invalid_digests: int = 0
    valid_logs: int = 0
    invalid_logs: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The closing text, as ``aws cloudtrail validate-logs`` prints it, plus the
        record count and any pending log files."""
        lines = [
            f"Results requested for {format_time(self.requested_start)} to "
            f"{format_time(self.requested_end)}"
        ]
        if not self.valid_digests and not self.invalid_digests:
            lines.append("No digests found")
        elif self.found_start is None or self.found_end is None:
            lines.append("No valid digests found in range")
        else:
            lines.append(
                f"Results found for {format_time(self.found_start)} to "
                f"{format_time(self.found_end)}:"
            )
        lines.append("")
        for valid, invalid, name in (
            (self.valid_digests, self.invalid_digests, "digest"),
            (self.valid_logs, self.invalid_logs, "log"),
        ):
            total = valid + invalid
            if total:
                text = f"{valid}/{total} {name} files valid"
                if invalid:
                    text += f", {invalid}/{total} {name} files INVALID"
                lines.append(text)
        if self.first_seq is not None:
            lines.append(
                f"{self.records} records in valid log files, seq {self.first_seq}..{self.last_seq}"
            )
        if self.pending:
            lines.append(f"{len(self.pending)} log files not yet covered by a digest")
        return "\n".join(lines) + "\n"


@dataclass
class _Digest:
    name: DigestName
    data: dict[str, Any]
    inflated: bytes
    signature: str


class _Validation:
    def __init__(
        self,
        root: Path,
        keys: Sequence[VerifierKey],
        report: ArchiveReport,
        start: datetime,
        end: datetime,
    ) -> None:
        self.root, self.report, self.start, self.end = root, report, start, end
        self.keys = {key_fingerprint(k.public_key): k.public_key for k in keys}
        self.bucket = DEFAULT_BUCKET
        self.cache: dict[str, _Digest | str | None] = {}
        self.listed: set[str] = set()  # log files listed by a signed digest
        self.seqs: dict[int, str] = {}
        self.ledgers: set[str] = set()
        self.missing: set[str] = set()

    # -- output

    def _digest_line(self, key: str, text: str) -> str:
        return f"Digest file\ts3://{self.bucket}/{key}\t{text}"

    def _log_line(self, key: str, text: str) -> str:
        return f"Log file\ts3://{self.bucket}/{key}\t{text}"

    def digest_invalid(self, key: str, reason: str) -> None:
        self.report.invalid_digests += 1
        self.report.problems.append(self._digest_line(key, f"INVALID: {reason}"))

    def log_invalid(self, key: str, reason: str) -> None:
        self.report.invalid_logs += 1
        self.report.problems.append(self._log_line(key, f"INVALID: {reason}"))

    def in_range(self, end: datetime) -> bool:
        return end > self.start and end - HOUR <= self.end

    # -- digests

    def load(self, name: DigestName) -> _Digest | str | None:
        """The digest if its own checks pass, the reason if not, None if absent."""
        if name.key not in self.cache:
            self.cache[name.key] = self._load(name)
        return self.cache[name.key]

    def _load(self, name: DigestName) -> _Digest | str | None:
        path = self.root / name.key
        if not path.is_file():
            return None
        try:
            inflated = gzip.decompress(path.read_bytes())
            data = json.loads(inflated)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (OSError, EOFError, ValueError, zlib.error):
            return "invalid format"
        required = (
            "digestPublicKeyFingerprint",
            "digestS3Bucket",
            "digestS3Object",
            "previousDigestSignature",
            "digestEndTime",
            "digestStartTime",
            "logFiles",
        )
        if any(k not in data for k in required) or not isinstance(data["logFiles"], list):
            return "invalid format"
        if isinstance(data["digestS3Bucket"], str):
            self.bucket = data["digestS3Bucket"]
        if data["digestS3Object"] != name.key:
            return "has been moved from its original location"
        public = self.keys.get(str(data["digestPublicKeyFingerprint"]))
        if public is None:
            return f"public key not found for fingerprint {data['digestPublicKeyFingerprint']}"
        try:
            meta = json.loads((self.root / signature_object(name.key)).read_bytes())
            signature = str(meta["signature"])
            raw_sig = bytes.fromhex(signature)
            algorithm_ok = meta.get("signature-algorithm") == SIGNATURE_ALGORITHM
            Ed25519PublicKey.from_public_bytes(public).verify(
                raw_sig, signing_string(data, inflated)
            )
        except (OSError, ValueError, KeyError, TypeError, InvalidSignature):
            return "signature verification failed"
        if not algorithm_ok or data.get("digestSignatureAlgorithm") != SIGNATURE_ALGORITHM:
            return "signature verification failed"
        try:
            if parse_time(str(data["digestEndTime"])) != name.end:
                return f"ends at {data['digestEndTime']}, its name says {format_time(name.end)}"
            parse_time(str(data["digestStartTime"]))
        except ValueError:
            return "invalid format"
        return _Digest(name, data, inflated, signature)

    def walk(self, chain: list[DigestName]) -> None:
        """AWS's traversal: from the newest digest in range back along the previous
        pointers; after a bad or missing digest, on with the next older one found."""
        listing = [d for d in chain if self.in_range(d.end)]
        by_key = {d.key: d for d in chain}

        def older(end: datetime) -> DigestName | None:
            return next((d for d in reversed(listing) if d.end < end), None)

        visited: set[str] = set()
        cur = listing[-1] if listing else None
        while cur is not None and cur.key not in visited:
            visited.add(cur.key)
            loaded = self.load(cur)
            if not isinstance(loaded, _Digest):
                self.digest_invalid(cur.key, loaded or "not found")
                cur = older(cur.end)
                continue
            self.check_logs(loaded)
            problem, cur = self._previous(loaded, by_key, older)
            if problem:
                self.digest_invalid(loaded.name.key, problem)
            else:
                self.report.valid_digests += 1
                self.report.valid.append(self._digest_line(loaded.name.key, "valid"))
            self._found(loaded)
        for d in listing:
            if d.key not in visited:
                self.digest_invalid(d.key, "not part of the digest chain")

    def _previous(
        self,
        digest: _Digest,
        by_key: Mapping[str, DigestName],
        older: Callable[[datetime], DigestName | None],
    ) -> tuple[str | None, DigestName | None]:
        """The chain check of ``digest`` against its previous digest, and where the
        walk goes next."""
        data, name = digest.data, digest.name
        prev_key = data.get("previousDigestS3Object")
        start = parse_time(str(data["digestStartTime"]))
        if prev_key is None:
            nxt = older(name.end)
            if nxt is not None:
                return "has no previous digest, but older digests exist", nxt
            return None, None
        prev_name = parse_digest_object(str(prev_key))
        if prev_name is None or prev_name.chain != name.chain or prev_name.end >= name.end:
            return f"previous digest {prev_key} is not an earlier digest of this trail", older(
                name.end
            )
        prev_name = by_key.get(prev_name.key, prev_name)
        if not self.in_range(prev_name.end):
            return None, None
        prev = self.load(prev_name)
        if prev is None:
            if prev_name.key not in self.missing:
                self.missing.add(prev_name.key)
                self.digest_invalid(prev_name.key, "not found")
            return None, older(prev_name.end)
        if isinstance(prev, str):
            return None, prev_name  # reported when the walk reaches it
        prev_end = parse_time(str(prev.data["digestEndTime"]))
        if prev_end != start:
            return (
                f"expected to end at {format_time(start)}, but previous digest ends at "
                f"{format_time(prev_end)}",
                prev_name,
            )
        if (
            data.get("previousDigestHashAlgorithm") != HASH_ALGORITHM
            or data.get("previousDigestHashValue") != hashlib.sha256(prev.inflated).hexdigest()
            or data.get("previousDigestSignature") != prev.signature
        ):
            return f"previous digest s3://{self.bucket}/{prev_key} does not match", prev_name
        return None, prev_name

    def _found(self, digest: _Digest) -> None:
        start = max(self.start, parse_time(str(digest.data["digestStartTime"])))
        end = min(self.end, parse_time(str(digest.data["digestEndTime"])))
        r = self.report
        r.found_start = start if r.found_start is None else min(r.found_start, start)
        r.found_end = end if r.found_end is None else max(r.found_end, end)

    # -- log files

    def check_logs(self, digest: _Digest) -> None:
        for entry in digest.data["logFiles"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("s3Object"), str):
                self.digest_invalid(digest.name.key, "invalid format")
                continue
            key = entry["s3Object"]
            if key in self.listed:
                self.log_invalid(key, "listed in more than one digest")
                continue
            self.listed.add(key)
            reason = self._check_log(key, entry)
            if reason:
                self.log_invalid(key, reason)
            else:
                self.report.valid_logs += 1
                self.report.valid.append(self._log_line(key, "valid"))

    def _check_log(self, key: str, entry: Mapping[str, Any]) -> str | None:
        path = self.root / key
        if not path.is_file():
            return "not found"
        try:
            inflated = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error):
            return "invalid format"
        if hashlib.sha256(inflated).hexdigest() != entry.get("hashValue"):
            return "hash value doesn't match"
        try:
            records = json.loads(inflated)["Records"]
            if not isinstance(records, list):
                raise TypeError("Records is not a list")
        except (ValueError, KeyError, TypeError):
            return "invalid format"
        try:
            ledger_id, rows = read_index(self.root / index_object(key))
        except FileNotFoundError:
            return "index not found"
        except (OSError, ValueError):
            return "index is invalid"
        if len(rows) != len(records) or any(
            not isinstance(rec, dict) or rec.get("eventID") != event_id(ledger_id, seq)
            for (seq, _), rec in zip(rows, records, strict=False)
        ):
            return "index does not match the records"
        self.ledgers.add(ledger_id)
        for seq, _ in rows:
            if seq in self.seqs:
                self.report.problems.append(
                    f"Records\tseq {seq}\tINVALID: in two log files: s3://{self.bucket}/"
                    f"{self.seqs[seq]} and s3://{self.bucket}/{key}"
                )
            self.seqs[seq] = key
        return None

    def unlisted(self, logs: Sequence[LogName], sealed_until: datetime | None) -> None:
        for log in logs:
            if log.key in self.listed or not self.in_range(log.hour + HOUR):
                continue
            if sealed_until is not None and log.hour < sealed_until:
                self.log_invalid(log.key, "not covered by a valid digest")
            else:
                self.report.pending.append(self._log_line(log.key, "not yet covered by a digest"))

    def expected_digests(self, logs: Sequence[LogName], digests: Sequence[DigestName]) -> None:
        """Every chain has a digest for every hour from its first one up to the newest
        sealed hour or the hour of the newest log file, whichever is later."""
        ends = [d.end for d in digests] + [log.hour for log in logs]
        if not ends:
            return
        frontier = max(ends)
        trails = sorted({d.trail for d in digests}) or ["keyledger"]
        chains: dict[tuple[str, str], datetime] = {}
        for d in digests:
            chains[d.chain] = min(chains.get(d.chain, d.end - HOUR), d.end - HOUR)
        for log in logs:
            chains[log.chain] = min(chains.get(log.chain, log.hour), log.hour)
        present = {d.key for d in digests}
        for (account, region), first in sorted(chains.items()):
            for trail in trails:
                hour = first
                while hour < frontier:
                    key = digest_object(account, region, trail, hour + HOUR)
                    if (
                        key not in present
                        and key not in self.missing
                        and self.in_range(hour + HOUR)
                    ):
                        self.missing.add(key)
                        self.digest_invalid(key, "not found")
                    hour += HOUR

    def gaps(self) -> None:
        if len(self.ledgers) > 1:
            self.report.problems.append(
                "Records\t-\tINVALID: log files of more than one ledger: "
                + ", ".join(sorted(self.ledgers))
            )
        if not self.seqs:
            return
        seqs = sorted(self.seqs)
        r = self.report
        r.records, r.first_seq, r.last_seq = len(seqs), seqs[0], seqs[-1]
        for a, b in itertools.pairwise(seqs):
            if b > a + 1:
                span = f"seq {a + 1}" if b == a + 2 else f"seq {a + 1}..{b - 1}"
                r.problems.append(f"Records\t{span}\tINVALID: in no valid log file")


def validate_archive(
    root: Path,
    keys: Sequence[VerifierKey],
    *,
    start: datetime | None = None,
    end: datetime | None = None,
) -> ArchiveReport:
    """Validate the archive under ``root`` against the trusted ``keys``, for the
    digests of the hours that overlap ``[start, end]`` (default: all of them, up to
    now).

    Tampering never raises: each problem is one line of the report. Raises
    VerificationError only when ``root`` is not a readable directory or the range is
    empty.
    """
    if not root.is_dir():
        raise VerificationError(f"{root} is not a readable directory")
    try:
        logs, digests = scan_archive(root)
    except OSError as err:
        raise VerificationError(f"{root} cannot be read ({err.strerror or err})") from None
    end = end or datetime.now(UTC)
    if start is None:
        firsts = [d.end - HOUR for d in digests] + [log.hour for log in logs]
        start = min(firsts) if firsts else end
    if start > end:
        raise VerificationError("start-time must occur before end-time")
    report = ArchiveReport(requested_start=start, requested_end=end)
    v = _Validation(root, keys, report, start, end)
    chains: dict[tuple[str, str, str], list[DigestName]] = {}
    for d in digests:
        chains.setdefault((d.account, d.region, d.trail), []).append(d)
    for chain in chains.values():
        v.walk(chain)
    sealed_until = max((d.end for d in digests), default=None)
    v.unlisted(logs, sealed_until)
    v.expected_digests(logs, digests)
    v.gaps()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ledger.archive_verify DIR --public-key FILE [--start-time T]
    [--end-time T] [--verbose]``: problems on stderr, the summary on stdout; 0 if the
    archive is valid, 1 if not, 2 if the directory or key file cannot be read."""
    p = argparse.ArgumentParser(description="Validate a KeyLedger CloudTrail archive.")
    p.add_argument("archive", type=Path, help="the archive directory (the bucket)")
    p.add_argument("--public-key", required=True, type=Path, help="trusted vkey lines")
    p.add_argument("--start-time", help="first hour to validate (RFC 3339)")
    p.add_argument("--end-time", help="last hour to validate (RFC 3339, default now)")
    p.add_argument("--verbose", action="store_true", help="also list valid files")
    a = p.parse_args(argv)
    try:
        keys = parse_verifier_keys(a.public_key.read_text(encoding="utf-8"))
        start = parse_time(a.start_time) if a.start_time else None
        end = parse_time(a.end_time) if a.end_time else None
        report = validate_archive(a.archive, keys, start=start, end=end)
    except (VerificationError, OSError, UnicodeDecodeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(render_header(a.archive, report))
    if a.verbose:
        for line in report.valid:
            print(line)
    for line in report.pending:
        print(line)
    for line in report.problems:
        print(line, file=sys.stderr)
    print(report.summary(), end="")
    return 0 if report.ok else 1


def render_header(root: Path, report: ArchiveReport) -> str:
    """The first line, as ``aws cloudtrail validate-logs`` starts."""
    return (
        f"Validating log files in {root} between {format_time(report.requested_start)} "
        f"and {format_time(report.requested_end)}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
