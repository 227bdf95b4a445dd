"""GenerateDataKey(WithoutPlaintext), ReEncrypt and GenerateRandom on real SoftHSM2,
on SQLite and PostgreSQL; none of their secret outputs reach the store or Kafka."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from functools import partial

import pytest

from consumers.broker import TansuBroker
from consumers.relay import AuditRelay, read_topic
from ledger.chain import verify_chain
from ledger.errors import (
    DisabledError,
    IncorrectKeyError,
    InvalidCiphertextError,
    KeyLedgerError,
    NotFoundError,
    ValidationError,
)
from ledger.service import Caller, KeyLedger

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
CTX = {"app": "billing"}


def key(ledger: KeyLedger) -> str:
    key_id: str = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    return key_id


@pytest.mark.parametrize(
    ("spec", "count", "size"),
    [
        ("AES_128", None, 16),
        ("AES_256", None, 32),
        (None, 1, 1),
        (None, 77, 77),
        (None, 1024, 1024),
    ],
)
def test_generate_data_key_returns_exactly_the_requested_bytes_and_decrypts_back(
    ledger: KeyLedger, spec: str | None, count: int | None, size: int
) -> None:
    k = key(ledger)
    out = ledger.generate_data_key(
        caller=CALLER, key_id=k, key_spec=spec, number_of_bytes=count, encryption_context=CTX
    )
    assert len(out["Plaintext"]) == size
    assert out["KeyId"] == ledger.settings.key_arn(k)
    back = ledger.decrypt(
        caller=CALLER, ciphertext_blob=out["CiphertextBlob"], encryption_context=CTX
    )
    assert back["Plaintext"] == out["Plaintext"]
    without = ledger.generate_data_key_without_plaintext(
        caller=CALLER, key_id=k, key_spec=spec, number_of_bytes=count, encryption_context=CTX
    )
    assert "Plaintext" not in without
    plain = ledger.decrypt(
        caller=CALLER, ciphertext_blob=without["CiphertextBlob"], encryption_context=CTX
    )
    assert len(plain["Plaintext"]) == size
    ops = [r.event()["call"]["operation"] for r in ledger.db.read_records(1, 100)]
    assert ops == ["GenerateDataKey", "Decrypt", "GenerateDataKeyWithoutPlaintext", "Decrypt"]


def test_reencrypt_moves_a_ciphertext_to_another_key_and_context(ledger: KeyLedger) -> None:
    src, dst = key(ledger), key(ledger)
    blob = ledger.encrypt(caller=CALLER, key_id=src, plaintext=b"move me", encryption_context=CTX)[
        "CiphertextBlob"
    ]
    out = ledger.re_encrypt(
        caller=CALLER,
        ciphertext_blob=blob,
        source_encryption_context=CTX,
        destination_key_id=dst,
        destination_encryption_context={"app": "archive"},
    )
    assert out["SourceKeyId"] == ledger.settings.key_arn(src)
    assert out["KeyId"] == ledger.settings.key_arn(dst)
    back = ledger.decrypt(
        caller=CALLER, ciphertext_blob=out["CiphertextBlob"], encryption_context={"app": "archive"}
    )
    assert back["Plaintext"] == b"move me" and back["KeyId"] == ledger.settings.key_arn(dst)
    record = ledger.db.read_records(ledger.db.head_seq() - 2, 1)[0].event()
    assert record["call"]["operation"] == "ReEncrypt"
    assert record["additional"]["sourceKeyArn"] == ledger.settings.key_arn(src)


def test_generate_random_returns_hsm_random_bytes_of_the_requested_length(
    ledger: KeyLedger,
) -> None:
    seen = {
        ledger.generate_random(caller=CALLER, number_of_bytes=32)["Plaintext"] for _ in range(5)
    }
    assert len(seen) == 5 and all(len(s) == 32 for s in seen)
    assert len(ledger.generate_random(caller=CALLER, number_of_bytes=1024)["Plaintext"]) == 1024


def test_bad_data_key_input_fails_as_aws_does_and_is_recorded_once(ledger: KeyLedger) -> None:
    k, other = key(ledger), key(ledger)
    blob = ledger.encrypt(caller=CALLER, key_id=k, plaintext=b"p", encryption_context=CTX)[
        "CiphertextBlob"
    ]
    off = key(ledger)
    ledger.disable_key(caller=CALLER, key_id=off)
    gdk = partial(ledger.generate_data_key, caller=CALLER)
    rnd = partial(ledger.generate_random, caller=CALLER)
    reenc = partial(ledger.re_encrypt, caller=CALLER, ciphertext_blob=blob)
    cases: list[tuple[type[KeyLedgerError], Callable[[], object]]] = [
        (ValidationError, lambda: gdk(key_id=k)),
        (ValidationError, lambda: gdk(key_id=k, key_spec="AES_512")),
        (ValidationError, lambda: gdk(key_id=k, number_of_bytes=1025)),
        (ValidationError, lambda: gdk(key_id=k, number_of_bytes=8, key_spec="AES_128")),
        (DisabledError, lambda: gdk(key_id=off, key_spec="AES_256")),
        (NotFoundError, lambda: gdk(key_id="alias/none", key_spec="AES_256")),
        (ValidationError, lambda: rnd()),
        (ValidationError, lambda: rnd(number_of_bytes=0)),
        (InvalidCiphertextError, lambda: reenc(destination_key_id=other)),
        (
            IncorrectKeyError,
            lambda: reenc(
                source_key_id=other, source_encryption_context=CTX, destination_key_id=other
            ),
        ),
        (DisabledError, lambda: reenc(source_encryption_context=CTX, destination_key_id=off)),
    ]
    for error, call in cases:
        before = ledger.db.head_seq()
        with pytest.raises(error) as info:
            call()
        new = ledger.db.read_records(before, 10)
        assert len(new) == 1
        assert new[0].event()["error_code"] == info.value.aws_name
    verify_chain(ledger.db.iter_chain(), ledger.db.iter_events())


@pytest.mark.kafka
def test_data_keys_and_random_bytes_never_reach_the_store_or_kafka(
    ledger: KeyLedger, kafka_broker: TansuBroker
) -> None:
    k, k2 = key(ledger), key(ledger)
    secrets_out: list[bytes] = []
    for spec in ("AES_128", "AES_256"):
        dk = ledger.generate_data_key(
            caller=CALLER, key_id=k, key_spec=spec, encryption_context=CTX
        )
        secrets_out += [dk["Plaintext"], dk["CiphertextBlob"]]
        moved = ledger.re_encrypt(
            caller=CALLER, ciphertext_blob=dk["CiphertextBlob"], source_encryption_context=CTX,
            destination_key_id=k2,
        )  # fmt: skip
        secrets_out.append(moved["CiphertextBlob"])
    for n in (16, 64, 1024):
        secrets_out.append(ledger.generate_random(caller=CALLER, number_of_bytes=n)["Plaintext"])
    stored = b"\n".join(r.data for r in ledger.db.read_records(0, 10_000))
    topic = "keyledger.audit.dk." + secrets.token_hex(4)
    with AuditRelay(
        reader=ledger.db, positions=ledger.db, bootstrap=kafka_broker.bootstrap,
        ledger_id=ledger.ledger_id, topic=topic,
    ) as relay:  # fmt: skip
        relay.run_once()
    published = b"\n".join(r.value for r in read_topic(kafka_broker.bootstrap, topic))
    assert len(stored) > 1000 and len(published) > 1000
    for secret in secrets_out:
        for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
            assert form not in stored
            assert form not in published
