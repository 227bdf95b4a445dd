"""Promise 2: no plaintext or ciphertext blob reaches the event store, logs or Kafka."""

from __future__ import annotations

import base64
import logging
import secrets
from pathlib import Path

import pytest

from consumers.broker import TansuBroker
from consumers.relay import AuditRelay, read_topic
from ledger.errors import KeyLedgerError
from ledger.service import Caller, KeyLedger

pytestmark = [pytest.mark.softhsm, pytest.mark.kafka]

CALLER = Caller(principal="arn:aws:iam::111122223333:root")


def forms(secret: bytes) -> list[bytes]:
    """The ways a leaked value could be spelled in storage or logs."""
    found = [secret, secret.hex().encode(), base64.b64encode(secret), secret.hex().upper().encode()]
    if len(secret) >= 16:  # any 16-byte window of a blob is enough to count as a leak
        found += [secret[8:24], base64.b64encode(secret[3:27])]
    return found


def store_bytes(ledger: KeyLedger) -> bytes:
    """Every byte the ledger persisted: the SQLite files or every row of every table."""
    if not ledger.db.is_postgres:
        ledger.close()  # checkpoint nothing; read the WAL as it is, too
        return b"".join(
            p.read_bytes() for p in Path(ledger.settings.data_dir).glob("ledger.sqlite3*")
        )
    chunks = []
    with ledger.db.transaction(commit=False) as c:
        tables = c.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
            (ledger.db.datastore.schema,),
        ).fetchall()
        for t in tables:
            name = ledger.db.table('"' + t["table_name"] + '"')
            for row in c.execute(f"SELECT * FROM {name}").fetchall():
                for v in row.values():
                    chunks.append(v if isinstance(v, bytes) else str(v).encode())
    assert len(chunks) > 10
    return b"\n".join(chunks)


def test_plaintext_and_blobs_never_reach_store_logs_or_kafka(
    ledger: KeyLedger, kafka_broker: TansuBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    secrets_seen: list[bytes] = []
    for size in (1, 37, 4096):
        plaintext = b"PT-" + secrets.token_bytes(size)[: max(size - 3, 1)]
        blob = ledger.encrypt(
            caller=CALLER, key_id=key, plaintext=plaintext, encryption_context={"k": "v"}
        )["CiphertextBlob"]
        assert (
            ledger.decrypt(caller=CALLER, ciphertext_blob=blob, encryption_context={"k": "v"})[
                "Plaintext"
            ]
            == plaintext
        )
        with pytest.raises(KeyLedgerError) as info:  # failures must not echo inputs either
            ledger.decrypt(caller=CALLER, ciphertext_blob=blob[:-2], encryption_context={"k": "v"})
        assert blob[:-2].hex() not in str(info.value)
        secrets_seen += [plaintext, blob]

    topic = "keyledger.audit.scan." + secrets.token_hex(4)
    with AuditRelay(
        reader=ledger.db,
        positions=ledger.db,
        bootstrap=kafka_broker.bootstrap,
        ledger_id=ledger.ledger_id,
        topic=topic,
    ) as relay:
        assert relay.run_once() == ledger.db.head_seq()
    kafka_bytes = b"\n".join(
        r.value + (r.key or b"") + b"".join(r.headers.values())
        for r in read_topic(kafka_broker.bootstrap, topic)
    )
    log_bytes = "\n".join(
        r.getMessage() + repr(r.args) + (r.exc_text or "") for r in caplog.records
    ).encode()
    stored = store_bytes(ledger)
    assert len(stored) > 1000 and len(kafka_bytes) > 1000
    for secret in secrets_seen:
        for form in forms(secret):
            if len(form) < 4:
                continue
            assert form not in stored, "leak in the event store"
            assert form not in kafka_bytes, "leak in Kafka"
            assert form not in log_bytes, "leak in the logs"
