"""Sign, GenerateMac, GenerateDataKey and GenerateRandom outputs never reach the event
store or Kafka, while their CloudTrail records keep AWS's requestParameters."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import orjson
import pytest

from consumers.broker import TansuBroker
from consumers.relay import AuditRelay, read_topic
from ledger.service import Caller, KeyLedger
from ledger.signatures import verify_digest
from tests.integration.test_no_secrets_stored import forms, store_bytes

pytestmark = [pytest.mark.softhsm, pytest.mark.kafka]

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
ROUNDS = 3


def test_crypto_outputs_never_reach_store_or_kafka(
    ledger: KeyLedger, kafka_broker: TansuBroker
) -> None:
    def create(spec: str, usage: str) -> str:
        meta = ledger.create_key(caller=CALLER, key_spec=spec, key_usage=usage)["KeyMetadata"]
        return str(meta["KeyId"])

    ecc = create("ECC_NIST_P256", "SIGN_VERIFY")
    rsa = create("RSA_2048", "SIGN_VERIFY")
    mac_key = create("HMAC_256", "GENERATE_VERIFY_MAC")
    aes = create("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    public = {k: ledger.get_public_key(caller=CALLER, key_id=k)["PublicKey"] for k in (ecc, rsa)}

    outputs: list[bytes] = []
    # (operation, requestParameters the CloudTrail record must carry)
    expected: list[tuple[str, dict[str, Any]]] = []
    for _ in range(ROUNDS):
        for key, alg, message_type in (
            (ecc, "ECDSA_SHA_256", "RAW"),
            (ecc, "ECDSA_SHA_256", "DIGEST"),
            (rsa, "RSASSA_PSS_SHA_256", "RAW"),
        ):
            message = secrets.token_bytes(32)
            signature = ledger.sign(
                caller=CALLER,
                key_id=key,
                message=message,
                signing_algorithm=alg,
                message_type=message_type,
            )["Signature"]
            digest = message if message_type == "DIGEST" else hashlib.sha256(message).digest()
            assert verify_digest(public[key], alg, digest, signature)
            outputs += [signature, message]
            expected.append(
                ("Sign", {"keyId": key, "signingAlgorithm": alg, "messageType": message_type})
            )

        message = secrets.token_bytes(32)
        mac = ledger.generate_mac(
            caller=CALLER, key_id=mac_key, message=message, mac_algorithm="HMAC_SHA_256"
        )["Mac"]
        assert len(mac) == 32
        outputs += [mac, message]
        expected.append(("GenerateMac", {"keyId": mac_key, "macAlgorithm": "HMAC_SHA_256"}))

        data_key = ledger.generate_data_key(caller=CALLER, key_id=aes, key_spec="AES_256")
        assert len(data_key["Plaintext"]) == 32
        outputs += [data_key["Plaintext"], data_key["CiphertextBlob"]]
        expected.append(("GenerateDataKey", {"keyId": aes, "keySpec": "AES_256"}))

        random = ledger.generate_random(caller=CALLER, number_of_bytes=64)["Plaintext"]
        assert len(random) == 64
        outputs.append(random)
        expected.append(("GenerateRandom", {"numberOfBytes": 64}))

    topic = "keyledger.audit.crypto-scan." + secrets.token_hex(4)
    with AuditRelay(
        reader=ledger.db,
        positions=ledger.db,
        bootstrap=kafka_broker.bootstrap,
        ledger_id=ledger.ledger_id,
        topic=topic,
    ) as relay:
        assert relay.run_once() == ledger.db.head_seq()
    published = read_topic(kafka_broker.bootstrap, topic)
    kafka_bytes = b"\n".join(
        r.value + (r.key or b"") + b"".join(r.headers.values()) for r in published
    )
    stored = store_bytes(ledger)  # closes a SQLite ledger: last use of it
    assert len(stored) > 1000 and len(kafka_bytes) > 1000

    for output in outputs:
        for form in forms(output):
            assert form not in stored, "leak in the event store"
            assert form not in kafka_bytes, "leak in Kafka"

    records = [orjson.loads(r.value)["record"] for r in published]
    crypto_ops = {op for op, _ in expected}
    seen = [
        (r["eventName"], r["requestParameters"])
        for r in records
        if r["eventName"] in crypto_ops and r.get("errorCode") is None
    ]
    assert sorted(seen, key=repr) == sorted(expected, key=repr)
    for r in records:
        if r["eventName"] in crypto_ops:
            assert r["readOnly"] is True
            assert not r["responseElements"], r["responseElements"]
