"""The archive writer on a real ledger, a real broker and digests signed in SoftHSM2:
relayed records spanning hours become a valid archive, exactly once across a crash."""

from __future__ import annotations

import gzip
import json
import secrets
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from typer.testing import CliRunner

from cli.main import app
from consumers.archive import ArchiveStore, ArchiveWriter
from consumers.broker import TansuBroker
from consumers.relay import AuditRelay
from ledger import audit
from ledger.archive_verify import event_id, index_object, scan_archive, validate_archive
from ledger.bootstrap import open_ledger
from ledger.clock import FixedClock
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings

pytestmark = [pytest.mark.softhsm, pytest.mark.kafka]

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
T0 = datetime(2026, 2, 3, 9, 5, tzinfo=UTC)
STEP = timedelta(minutes=6)
CALLS = 36  # 36 x 6 min: records from 09:05 to 12:41, four hours


class SimulatedCrashError(Exception):
    pass


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def ledger(
    tmp_path: Path, softhsm_keystore: Pkcs11KeyStore, clock: FixedClock
) -> Iterator[KeyLedger]:
    app = open_ledger(Settings(data_dir=tmp_path / "data"), keystore=softhsm_keystore, clock=clock)
    yield app
    app.close()


@pytest.fixture
def topic(ledger: KeyLedger, clock: FixedClock, kafka_broker: TansuBroker) -> str:
    """A fresh topic holding the relayed records of a ledger spanning four hours."""
    keys = [ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"] for _ in range(3)]
    for i in range(CALLS):
        clock.advance(STEP)
        ledger.encrypt(caller=CALLER, key_id=keys[i % 3], plaintext=b"x")
    name = "keyledger.audit.archive-it." + secrets.token_hex(4)
    with AuditRelay(
        reader=ledger.db,
        positions=ledger.db,
        bootstrap=kafka_broker.bootstrap,
        ledger_id=ledger.ledger_id,
        topic=name,
    ) as relay:
        assert relay.run_once() == ledger.db.head_seq()
    return name


def _writer(
    ledger: KeyLedger, root: Path, bootstrap: str, topic: str, group: str, **store_kw: object
) -> ArchiveWriter:
    key = audit.ensure_signing_key(ledger)[-1]
    store = ArchiveStore(
        root,
        signer=ledger.keystore,
        signing_label=key.label,
        public_key=key.public_key,
        max_records_per_file=5,
        **store_kw,  # type: ignore[arg-type]
    )
    end_of_last_hour = T0.replace(minute=0) + timedelta(hours=4)
    return ArchiveWriter(
        store=store,
        bootstrap=bootstrap,
        topic=topic,
        group=group,
        clock=FixedClock(end_of_last_hour + timedelta(minutes=6)),
        close_after=timedelta(minutes=5),
        timeout=60.0,
    )


def _archived_seqs(root: Path, ledger_id: str) -> Counter[int]:
    """How often each seq is in the archive, by index and by each record's eventID."""
    seqs: Counter[int] = Counter()
    for log in scan_archive(root)[0]:
        records = json.loads(gzip.decompress((root / log.key).read_bytes()))["Records"]
        index = json.loads((root / index_object(log.key)).read_bytes())["records"]
        assert [r["eventID"] for r in records] == [event_id(ledger_id, s) for s, _ in index]
        seqs.update(s for s, _ in index)
    return seqs


def _committed(bootstrap: str, topic: str, group: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in parts)
    finally:
        consumer.close(autocommit=False)


def test_relayed_records_over_four_hours_become_an_archive_that_validates(
    ledger: KeyLedger, topic: str, kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    n = ledger.db.head_seq()
    root, group = tmp_path / "bucket", "archive-" + secrets.token_hex(4)
    with _writer(ledger, root, kafka_broker.bootstrap, topic, group) as writer:
        assert writer.run_once() == n
        assert writer.store.digests_written == 4  # 09:00 .. 13:00, one chain
    assert _archived_seqs(root, ledger.ledger_id) == Counter(range(1, n + 1))
    assert _committed(kafka_broker.bootstrap, topic, group) == n  # every offset, once

    report = validate_archive(root, audit.verifier_keys(ledger.db), end=T0 + timedelta(days=1))
    assert report.problems == [] and report.pending == []
    assert (report.valid_digests, report.records, report.last_seq) == (4, n, n)

    vkey = tmp_path / "ledger.vkey"
    vkey.write_text("".join(k.vkey + "\n" for k in audit.signing_keys(ledger.db)))
    result = CliRunner().invoke(
        app, ["audit", "validate-archive", str(root), "--public-key", str(vkey)]
    )
    assert result.exit_code == 0, result.output
    assert "4/4 digest files valid" in result.stdout


@pytest.mark.parametrize("crash_at_file", [1, 3])
def test_a_writer_killed_after_a_file_loses_and_duplicates_no_record_on_restart(
    ledger: KeyLedger,
    topic: str,
    kafka_broker: TansuBroker,
    tmp_path: Path,
    crash_at_file: int,
) -> None:
    n = ledger.db.head_seq()
    root, group = tmp_path / "bucket", "archive-" + secrets.token_hex(4)
    written: list[Path] = []

    def crash(path: Path) -> None:
        written.append(path)
        if len(written) == crash_at_file:  # the file is durable, its offsets not committed
            raise SimulatedCrashError(path.name)

    with (
        _writer(ledger, root, kafka_broker.bootstrap, topic, group, after_file=crash) as first,
        pytest.raises(SimulatedCrashError),
    ):
        first.run_once()
    assert len(scan_archive(root)[0]) == crash_at_file
    before = _archived_seqs(root, ledger.ledger_id)
    assert before == Counter(range(1, len(before) + 1))
    assert _committed(kafka_broker.bootstrap, topic, group) < len(before)  # crashed file's not

    with _writer(ledger, root, kafka_broker.bootstrap, topic, group) as second:
        assert second.run_once() == n - len(before)  # resumed after the crashed file
    with _writer(ledger, root, kafka_broker.bootstrap, topic, group) as third:
        assert third.run_once() == 0
        assert third.store.files_written == 0 and third.store.digests_written == 0

    assert _archived_seqs(root, ledger.ledger_id) == Counter(range(1, n + 1))
    assert _committed(kafka_broker.bootstrap, topic, group) == n
    report = validate_archive(root, audit.verifier_keys(ledger.db), end=T0 + timedelta(days=1))
    assert report.problems == [] and report.records == n
