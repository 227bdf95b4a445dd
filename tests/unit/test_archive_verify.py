"""The archive validator (and the file side of the archive writer) on archives built
in a temp dir with a stand-in signer: every kind of tampering is named."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import shutil
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from consumers.archive import ArchivedRecord, ArchiveStore
from consumers.cloudtrail import cloudtrail_record
from consumers.cloudtrail import event_id as view_event_id
from ledger.archive_verify import (
    ArchiveReport,
    event_id,
    index_object,
    key_fingerprint,
    parse_digest_object,
    scan_archive,
    signature_object,
    signing_string,
    validate_archive,
)
from ledger.offline_verify import VerifierKey, parse_verifier_key, verifier_key_text
from tests.fakes import FakeKeyStore
from tests.fakes_relay import crypto_used

LEDGER = "ledger-archive-unit"
LABEL = "keyledger-ledger-signing-00aa11bb22cc33dd"
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
N = 30
HOURS = 3
KEY_ID = str(uuid.UUID(int=42))
BUCKET = "s3://keyledger-archive/"


class SimulatedCrashError(Exception):
    pass


@pytest.fixture
def signer() -> FakeKeyStore:
    return FakeKeyStore()


@pytest.fixture
def public_key(signer: FakeKeyStore) -> bytes:
    return signer.generate_ledger_signing_key(LABEL)


@pytest.fixture
def keys(public_key: bytes) -> list[VerifierKey]:
    return [parse_verifier_key(verifier_key_text("keyledger/unit/00aa", public_key))]


def _record(seq: int, at: datetime) -> ArchivedRecord:
    event = crypto_used(KEY_ID, "Encrypt" if seq % 2 else "Decrypt", at=at)
    if seq % 5 == 0:  # a second chain: same account, another region
        event["call"]["region"] = "eu-west-1"
    digest = hashlib.sha256(str(seq).encode()).digest()
    env = cloudtrail_record(event, seq=seq, record_hash=digest, prev=bytes(32), ledger_id=LEDGER)
    return ArchivedRecord(env["seq"], env["recordHash"], env["ledger"], env["record"])


def _store(root: Path, signer: FakeKeyStore, public_key: bytes, **kw: object) -> ArchiveStore:
    options: dict[str, object] = {"max_records_per_file": 4, **kw}
    return ArchiveStore(
        root,
        signer=signer,
        signing_label=LABEL,
        public_key=public_key,
        **options,  # type: ignore[arg-type]
    )


def _times(n: int = N, hours: int = HOURS) -> list[datetime]:
    step = timedelta(seconds=hours * 3600 / n)
    return [T0 + step * i + timedelta(seconds=7) for i in range(n)]


@pytest.fixture
def archive(tmp_path: Path, signer: FakeKeyStore, public_key: bytes) -> Path:
    """Records 1..30 over 10:00-13:00 in two regions, every hour sealed."""
    root = tmp_path / "bucket"
    store = _store(root, signer, public_key)
    for seq, at in enumerate(_times(), start=1):
        store.add(_record(seq, at))
    store.seal_due(T0 + timedelta(hours=HOURS, minutes=6), timedelta(minutes=5))
    return root


def _validate(root: Path, keys: list[VerifierKey]) -> ArchiveReport:
    return validate_archive(root, keys, end=T0 + timedelta(days=1))


def _digests(root: Path, region: str = "us-east-1") -> list[str]:
    return [d.key for d in scan_archive(root)[1] if d.region == region]


def _logs_of(root: Path, digest_key: str) -> list[str]:
    data = json.loads(gzip.decompress((root / digest_key).read_bytes()))
    return [f["s3Object"] for f in data["logFiles"]]


def _rewrite_gz(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(gzip.decompress(path.read_bytes()))
    change(data)
    path.write_bytes(gzip.compress(json.dumps(data).encode()))


def _problems_naming(report: ArchiveReport, key: str) -> list[str]:
    return [p for p in report.problems if f"\t{BUCKET}{key}\t" in p]


# ---------------------------------------------------------------- format


def test_an_untouched_archive_validates_every_digest_log_file_and_record(
    archive: Path, keys: list[VerifierKey]
) -> None:
    report = _validate(archive, keys)
    logs, digests = scan_archive(archive)
    assert report.problems == []
    assert report.ok
    assert len(digests) == 2 * HOURS  # one per hour and region
    assert report.valid_digests == len(digests) and report.invalid_digests == 0
    assert report.valid_logs == len(logs) and report.invalid_logs == 0
    assert (report.records, report.first_seq, report.last_seq) == (N, 1, N)
    assert report.pending == []
    assert "6/6 digest files valid" in report.summary()
    assert "Results found for 2026-03-01T10:00:00Z to 2026-03-01T13:00:00Z:" in report.summary()


def test_digests_follow_aws_format_and_chain_by_hash_and_signature(
    archive: Path, public_key: bytes
) -> None:
    first, second = _digests(archive)[:2]
    assert first.endswith(
        "_CloudTrail-Digest_us-east-1_keyledger_us-east-1_20260301T110000Z.json.gz"
    )
    assert first.startswith("AWSLogs/111122223333/CloudTrail-Digest/us-east-1/2026/03/01/")
    d1 = json.loads(gzip.decompress((archive / first).read_bytes()))
    raw2 = gzip.decompress((archive / second).read_bytes())
    d2 = json.loads(raw2)
    assert d1["previousDigestSignature"] is None and d1["previousDigestS3Object"] is None
    assert (d1["digestStartTime"], d1["digestEndTime"]) == (
        "2026-03-01T10:00:00Z",
        "2026-03-01T11:00:00Z",
    )
    assert d1["digestSignatureAlgorithm"] == "Ed25519"
    assert d1["digestPublicKeyFingerprint"] == key_fingerprint(public_key)
    sig1 = json.loads((archive / signature_object(first)).read_bytes())
    assert sig1["signature-algorithm"] == "Ed25519"
    assert d2["previousDigestS3Object"] == first
    assert d2["previousDigestSignature"] == sig1["signature"]
    assert (
        d2["previousDigestHashValue"]
        == hashlib.sha256(gzip.decompress((archive / first).read_bytes())).hexdigest()
    )
    assert (
        signing_string(d2, raw2)
        == (
            f"2026-03-01T12:00:00Z\nkeyledger-archive/{second}\n"
            f"{hashlib.sha256(raw2).hexdigest()}\n{sig1['signature']}"
        ).encode()
    )
    entry = d1["logFiles"][0]
    assert set(entry) == {
        "s3Bucket",
        "s3Object",
        "hashValue",
        "hashAlgorithm",
        "newestEventTime",
        "oldestEventTime",
    }
    body = gzip.decompress((archive / entry["s3Object"]).read_bytes())
    assert entry["hashValue"] == hashlib.sha256(body).hexdigest()  # uncompressed, as AWS


def test_log_files_hold_bare_cloudtrail_records_and_an_index_maps_them_to_seqs(
    archive: Path,
) -> None:
    logs, _ = scan_archive(archive)
    seen: list[int] = []
    for log in logs:
        records = json.loads(gzip.decompress((archive / log.key).read_bytes()))["Records"]
        index = json.loads((archive / index_object(log.key)).read_bytes())
        assert index["ledger"] == LEDGER
        assert all("seq" not in r and "recordHash" not in r for r in records)
        for (seq, record_hash), record in zip(index["records"], records, strict=True):
            assert record["eventID"] == event_id(LEDGER, seq)
            assert record_hash == hashlib.sha256(str(seq).encode()).hexdigest()
            assert log.first <= seq <= log.last
            assert record["awsRegion"] == log.region
            seen.append(seq)
    assert sorted(seen) == list(range(1, N + 1))


def test_the_archive_event_id_is_the_cloudtrail_view_event_id() -> None:
    for seq in (1, 2, 10**9):
        assert event_id(LEDGER, seq) == view_event_id(LEDGER, seq)


def test_the_archive_validator_imports_only_the_standard_library_and_cryptography() -> None:
    source = Path(sys.modules["ledger.archive_verify"].__file__ or "").read_text()
    roots, ledger_modules = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
            if node.module.startswith("ledger"):
                ledger_modules.add(node.module)
    assert roots - sys.stdlib_module_names == {"cryptography", "ledger"}
    assert ledger_modules == {"ledger.offline_verify"}


# ---------------------------------------------------------------- tampering


def test_a_modified_log_file_is_named_because_its_hash_value_does_not_match(
    archive: Path, keys: list[VerifierKey]
) -> None:
    victim = _logs_of(archive, _digests(archive)[1])[0]

    def change(data: dict) -> None:
        data["Records"][0]["sourceIPAddress"] = "203.0.113.9"

    _rewrite_gz(archive / victim, change)
    report = _validate(archive, keys)
    assert _problems_naming(report, victim) == [
        f"Log file\t{BUCKET}{victim}\tINVALID: hash value doesn't match"
    ]
    assert report.invalid_logs == 1 and report.invalid_digests == 0
    assert any(
        p.startswith("Records\tseq ") and "in no valid log file" in p for p in report.problems
    )
    assert not report.ok


def test_a_deleted_log_file_is_named_as_not_found_and_its_records_as_a_gap(
    archive: Path, keys: list[VerifierKey]
) -> None:
    victim = _logs_of(archive, _digests(archive)[0])[1]
    seqs = json.loads((archive / index_object(victim)).read_bytes())["records"]
    (archive / victim).unlink()
    report = _validate(archive, keys)
    assert _problems_naming(report, victim) == [f"Log file\t{BUCKET}{victim}\tINVALID: not found"]
    missing = [s for s, _ in seqs]
    gap = [p for p in report.problems if p.startswith("Records")]
    assert gap and all("in no valid log file" in p for p in gap)
    assert str(missing[0]) in gap[0]


def test_a_modified_digest_fails_signature_verification_and_its_log_files_are_unvouched(
    archive: Path, keys: list[VerifierKey]
) -> None:
    victim = _digests(archive)[1]
    its_logs = _logs_of(archive, victim)

    def change(data: dict) -> None:
        data["logFiles"] = data["logFiles"][1:]  # hide a log file

    _rewrite_gz(archive / victim, change)
    report = _validate(archive, keys)
    assert _problems_naming(report, victim) == [
        f"Digest file\t{BUCKET}{victim}\tINVALID: signature verification failed"
    ]
    for log in its_logs:
        assert _problems_naming(report, log) == [
            f"Log file\t{BUCKET}{log}\tINVALID: not covered by a valid digest"
        ]
    assert report.invalid_digests == 1


@pytest.mark.parametrize("position", [0, 1], ids=["first", "middle"])
def test_a_deleted_digest_is_named_as_not_found(
    archive: Path, keys: list[VerifierKey], position: int
) -> None:
    victim = _digests(archive)[position]
    (archive / victim).unlink()
    report = _validate(archive, keys)
    assert _problems_naming(report, victim) == [
        f"Digest file\t{BUCKET}{victim}\tINVALID: not found"
    ]
    assert report.invalid_digests == 1
    assert report.valid_digests == 2 * HOURS - 1


def test_a_deleted_newest_digest_is_named_once_later_log_files_exist(
    archive: Path, keys: list[VerifierKey], signer: FakeKeyStore, public_key: bytes
) -> None:
    store = _store(archive, signer, public_key)  # restart, then one more record at 13:30
    store.add(_record(N + 1, T0 + timedelta(hours=HOURS, minutes=30)))
    store.flush()
    newest = _digests(archive)[-1]
    (archive / newest).unlink()
    report = _validate(archive, keys)
    assert _problems_naming(report, newest) == [
        f"Digest file\t{BUCKET}{newest}\tINVALID: not found"
    ]
    assert len(report.pending) == 1  # the 13:30 file, not sealed yet


def test_a_deleted_newest_digest_alone_leaves_its_log_files_reported_as_not_yet_covered(
    archive: Path, keys: list[VerifierKey]
) -> None:
    # The limitation AWS shares: without a later file nothing proves the hour was sealed.
    for region in ("us-east-1", "eu-west-1"):
        newest = _digests(archive, region)[-1]
        (archive / newest).unlink()
    report = _validate(archive, keys)
    assert report.problems == []
    assert report.pending and all("not yet covered by a digest" in p for p in report.pending)
    assert "log files not yet covered by a digest" in report.summary()


def test_a_modified_signature_file_fails_signature_verification(
    archive: Path, keys: list[VerifierKey]
) -> None:
    victim = _digests(archive)[2]
    sig_path = archive / signature_object(victim)
    meta = json.loads(sig_path.read_bytes())
    meta["signature"] = ("00" if meta["signature"][:2] != "00" else "11") + meta["signature"][2:]
    sig_path.write_text(json.dumps(meta))
    report = _validate(archive, keys)
    assert _problems_naming(report, victim) == [
        f"Digest file\t{BUCKET}{victim}\tINVALID: signature verification failed"
    ]


def test_a_deleted_signature_file_fails_signature_verification(
    archive: Path, keys: list[VerifierKey]
) -> None:
    victim = _digests(archive, "eu-west-1")[0]
    (archive / signature_object(victim)).unlink()
    report = _validate(archive, keys)
    assert _problems_naming(report, victim) == [
        f"Digest file\t{BUCKET}{victim}\tINVALID: signature verification failed"
    ]


def test_another_public_key_validates_no_digest(archive: Path) -> None:
    other = FakeKeyStore().generate_ledger_signing_key(LABEL)
    report = _validate(archive, [parse_verifier_key(verifier_key_text("someone/else", other))])
    assert report.valid_digests == 0 and report.invalid_digests == 2 * HOURS
    assert all(
        "INVALID: public key not found for fingerprint" in p
        for p in report.problems
        if p.startswith("Digest file")
    )
    assert not report.ok


def test_digests_swapped_between_hours_are_named_as_moved(
    archive: Path, keys: list[VerifierKey]
) -> None:
    a, b = _digests(archive)[:2]
    for suffix in ("", ".sig"):
        pa, pb = archive / (a + suffix), archive / (b + suffix)
        tmp = pa.with_name("swap")
        shutil.move(pa, tmp)
        shutil.move(pb, pa)
        shutil.move(tmp, pb)
    report = _validate(archive, keys)
    for key in (a, b):
        assert _problems_naming(report, key) == [
            f"Digest file\t{BUCKET}{key}\tINVALID: has been moved from its original location"
        ]


def test_a_validly_signed_digest_that_skips_its_predecessor_breaks_the_chain(
    archive: Path, keys: list[VerifierKey], signer: FakeKeyStore
) -> None:
    # Someone holding the signing key relinks hour 3 to hour 1, dropping hour 2.
    first, skipped, last = _digests(archive)
    first_sig = json.loads((archive / signature_object(first)).read_bytes())["signature"]

    def relink(data: dict) -> None:
        data["previousDigestS3Object"] = first
        data["previousDigestSignature"] = first_sig
        data["previousDigestHashValue"] = hashlib.sha256(
            gzip.decompress((archive / first).read_bytes())
        ).hexdigest()

    _rewrite_gz(archive / last, relink)
    raw = gzip.decompress((archive / last).read_bytes())
    sig = signer.ledger_sign(LABEL, signing_string(json.loads(raw), raw)).hex()
    (archive / signature_object(last)).write_text(
        json.dumps({"signature": sig, "signature-algorithm": "Ed25519"})
    )
    report = _validate(archive, keys)
    assert _problems_naming(report, last) == [
        f"Digest file\t{BUCKET}{last}\tINVALID: expected to end at 2026-03-01T12:00:00Z, "
        "but previous digest ends at 2026-03-01T11:00:00Z"
    ]
    assert _problems_naming(report, skipped) == [
        f"Digest file\t{BUCKET}{skipped}\tINVALID: not part of the digest chain"
    ]


def test_an_index_that_lies_about_a_seq_is_named(archive: Path, keys: list[VerifierKey]) -> None:
    victim = _logs_of(archive, _digests(archive)[0])[0]
    path = archive / index_object(victim)
    index = json.loads(path.read_bytes())
    index["records"][0][0] += 1000
    path.write_text(json.dumps(index))
    report = _validate(archive, keys)
    assert _problems_naming(report, victim) == [
        f"Log file\t{BUCKET}{victim}\tINVALID: index does not match the records"
    ]


def test_a_log_file_added_to_a_sealed_hour_is_named(archive: Path, keys: list[VerifierKey]) -> None:
    original = _logs_of(archive, _digests(archive)[0])[0]
    extra = original.replace("_1-", "_999-").replace("-4.json.gz", "-1000.json.gz")
    assert extra != original and parse_digest_object(extra) is None
    shutil.copy(archive / original, archive / extra)
    shutil.copy(archive / index_object(original), archive / index_object(extra))
    report = _validate(archive, keys)
    assert _problems_naming(report, extra) == [
        f"Log file\t{BUCKET}{extra}\tINVALID: not covered by a valid digest"
    ]


def test_a_time_range_validates_only_the_digests_of_its_hours(
    archive: Path, keys: list[VerifierKey]
) -> None:
    (archive / _digests(archive)[0]).unlink()  # outside the range below
    report = validate_archive(
        archive,
        keys,
        start=T0 + timedelta(hours=1, minutes=10),
        end=T0 + timedelta(hours=1, minutes=50),
    )
    assert report.ok, report.problems
    assert report.valid_digests == 2  # hour 11:00-12:00 of both regions


# ---------------------------------------------------------------- the writer's files


def test_a_restarted_store_resumes_after_the_highest_archived_seq(
    archive: Path, signer: FakeKeyStore, public_key: bytes, keys: list[VerifierKey]
) -> None:
    store = _store(archive, signer, public_key)
    assert store.next_seq == N + 1
    store.add(_record(N + 1, T0 + timedelta(hours=HOURS, minutes=1)))
    store.seal_due(T0 + timedelta(hours=HOURS + 1, minutes=6), timedelta(minutes=5))
    report = _validate(archive, keys)
    assert report.ok, report.problems
    assert (report.records, report.last_seq) == (N + 1, N + 1)


def test_a_write_cut_short_by_a_crash_is_removed_and_redone_on_restart(
    tmp_path: Path, signer: FakeKeyStore, public_key: bytes, keys: list[VerifierKey]
) -> None:
    root = tmp_path / "bucket"

    def crash(path: Path) -> None:
        raise SimulatedCrashError(path.name)

    store = _store(root, signer, public_key, after_file=crash, max_records_per_file=6)
    times = _times()
    for seq in range(1, 6):  # pending: 5 records in two regions
        store.add(_record(seq, times[seq - 1]))
    with pytest.raises(SimulatedCrashError):
        store.add(_record(6, times[5]))  # full: the first of two files, then the "crash"
    assert len(scan_archive(root)[0]) == 1
    restarted = _store(root, signer, public_key)
    assert restarted.next_seq == 1  # the unfinished write is gone
    for seq, at in enumerate(times, start=1):
        restarted.add(_record(seq, at))
    restarted.seal_due(T0 + timedelta(hours=HOURS, minutes=6), timedelta(minutes=5))
    report = _validate(root, keys)
    assert report.ok, report.problems
    assert (report.records, report.first_seq, report.last_seq) == (N, 1, N)


def test_hours_without_records_get_empty_digests_and_the_chain_runs_through_them(
    tmp_path: Path, signer: FakeKeyStore, public_key: bytes, keys: list[VerifierKey]
) -> None:
    store = _store(tmp_path, signer, public_key)
    store.add(_record(1, T0 + timedelta(minutes=1)))
    store.add(_record(2, T0 + timedelta(hours=3, minutes=1)))  # 11:00 and 12:00 stay empty
    store.seal_due(T0 + timedelta(hours=4, minutes=6), timedelta(minutes=5))
    digests = _digests(tmp_path)
    assert len(digests) == 4
    empty = json.loads(gzip.decompress((tmp_path / digests[1]).read_bytes()))
    assert empty["logFiles"] == [] and empty["newestEventTime"] is None
    assert empty["previousDigestS3Object"] == digests[0]
    report = _validate(tmp_path, keys)
    assert report.ok, report.problems
    assert (report.valid_digests, report.records) == (4, 2)


def test_a_record_arriving_after_its_hour_was_sealed_goes_into_the_current_hour(
    tmp_path: Path, signer: FakeKeyStore, public_key: bytes, keys: list[VerifierKey]
) -> None:
    store = _store(tmp_path, signer, public_key)
    store.add(_record(1, T0 + timedelta(minutes=59)))
    store.add(_record(2, T0 + timedelta(hours=1, minutes=1)))  # seals 10:00-11:00
    store.add(_record(3, T0 + timedelta(minutes=59, seconds=30)))  # late, after 11:01
    store.seal_due(T0 + timedelta(hours=2, minutes=6), timedelta(minutes=5))
    logs, _ = scan_archive(tmp_path)
    assert [(log.stamp.hour, log.stamp.minute, log.first, log.last) for log in logs] == [
        (10, 59, 1, 1),
        (11, 0, 2, 3),  # the file starts at its hour: the late record is its oldest
    ]
    report = _validate(tmp_path, keys)
    assert report.ok, report.problems
    assert report.records == 3


def test_a_record_out_of_seq_order_is_refused(
    tmp_path: Path, signer: FakeKeyStore, public_key: bytes
) -> None:
    from consumers.archive import ArchiveError

    store = _store(tmp_path, signer, public_key)
    with pytest.raises(ArchiveError, match="expected seq 1"):
        store.add(_record(2, T0))


# ---------------------------------------------------------------- the command


def test_validate_archive_command_exits_zero_and_prints_aws_style_totals(
    archive: Path, keys: list[VerifierKey], tmp_path: Path, public_key: bytes
) -> None:
    vkey = tmp_path / "ledger.vkey"
    vkey.write_text(verifier_key_text("keyledger/unit/00aa", public_key) + "\n")
    result = CliRunner().invoke(
        app,
        [
            "audit",
            "validate-archive",
            str(archive),
            "--public-key",
            str(vkey),
            "--end-time",
            "2026-03-02T00:00:00Z",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Validating log files in {archive} between ")
    assert "Results requested for 2026-03-01T10:00:00Z to 2026-03-02T00:00:00Z" in result.stdout
    assert "6/6 digest files valid" in result.stdout
    assert result.stderr == ""


def test_validate_archive_command_exits_one_and_names_the_bad_file_on_stderr(
    archive: Path, tmp_path: Path, public_key: bytes
) -> None:
    vkey = tmp_path / "ledger.vkey"
    vkey.write_text(verifier_key_text("keyledger/unit/00aa", public_key) + "\n")
    victim = _logs_of(archive, _digests(archive)[0])[0]
    (archive / victim).unlink()
    result = CliRunner().invoke(
        app, ["audit", "validate-archive", str(archive), "--public-key", str(vkey)]
    )
    assert result.exit_code == 1
    assert f"Log file\t{BUCKET}{victim}\tINVALID: not found" in result.stderr
    assert "log files INVALID" in result.stdout
