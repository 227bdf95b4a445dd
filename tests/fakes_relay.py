"""In-memory ledger reader and position store for relay and view tests.

The records are realistic: canonical bytes via ``ledger.records.canonical``, SHA-256
record hashes and a ``prev`` chain from ``GENESIS``, and stored events shaped like
the write side's (including fields the published view must never carry, such as
HSM-wrapped material on ``Key.Created``).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from ledger.records import GENESIS, LedgerRecord, canonical, record_hash

ACCOUNT = "111122223333"
REGION = "us-east-1"
PRINCIPAL = f"arn:aws:iam::{ACCOUNT}:user/alice"
USER_AGENT = "keyledger-cli/0.1.0"
MODEL = "ledger.domain.model"

# What a stored Key.Created carries for replay and must never be published.
WRAPPED_MARKER = b"HSM-WRAPPED-KEY-MATERIAL-never-publish-me"
WRAPPED_B64 = base64.b64encode(WRAPPED_MARKER).decode("ascii")
MATERIAL_ID = "9f" * 32

BASE_TIME = datetime(2026, 11, 25, 1, 55, 0, 123456, tzinfo=UTC)


class InMemoryLedger:
    """A ``LedgerReader`` over a list of chained records."""

    def __init__(self) -> None:
        self._records: list[LedgerRecord] = []

    def append(self, event: dict[str, Any]) -> LedgerRecord:
        data = canonical(event)
        prev = self._records[-1].record_hash if self._records else GENESIS
        record = LedgerRecord(
            seq=len(self._records) + 1, data=data, record_hash=record_hash(data), prev=prev
        )
        self._records.append(record)
        return record

    def extend(self, events: Sequence[dict[str, Any]]) -> None:
        for event in events:
            self.append(event)

    def read_records(self, after_seq: int, limit: int) -> Sequence[LedgerRecord]:
        return self._records[after_seq : after_seq + limit]

    def head_seq(self) -> int:
        return len(self._records)

    def record(self, seq: int) -> LedgerRecord:
        return self._records[seq - 1]


class InMemoryPositions:
    """A ``PositionStore`` in a dict."""

    def __init__(self) -> None:
        self.positions: dict[str, int] = {}

    def get_position(self, name: str) -> int:
        return self.positions.get(name, 0)

    def set_position(self, name: str, position: int) -> None:
        self.positions[name] = position


def key_arn(key_id: str) -> str:
    return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"


def _call(operation: str, *, service: bool = False) -> dict[str, Any]:
    return {
        "operation": operation,
        "request_id": None if service else str(uuid.uuid4()),
        "principal": None if service else PRINCIPAL,
        "source_ip": None if service else "127.0.0.1",
        "user_agent": None if service else USER_AGENT,
        "region": REGION,
        "account_id": ACCOUNT,
        "service_initiated": service,
    }


def _base(topic: str, key_id: str | None, version: int, at: datetime) -> dict[str, Any]:
    return {
        "originator_id": key_id or str(uuid.uuid4()),
        "originator_version": version,
        "topic": f"{MODEL}:{topic}",
        "timestamp": at.isoformat(),
    }


def key_created(key_id: str, *, at: datetime = BASE_TIME, version: int = 1) -> dict[str, Any]:
    arn = key_arn(key_id)
    return {
        **_base("Key.Created", key_id, version, at),
        "call": _call("CreateKey"),
        "key_arn": arn,
        "request": {
            "description": "",
            "keySpec": "SYMMETRIC_DEFAULT",
            "keyUsage": "ENCRYPT_DECRYPT",
            "origin": "AWS_KMS",
            "bypassPolicyLockoutSafetyCheck": False,
        },
        "response": {
            "keyMetadata": {
                "AWSAccountId": ACCOUNT,
                "keyId": key_id,
                "arn": arn,
                "creationDate": at.isoformat(),
                "enabled": True,
                "description": "",
                "keyUsage": "ENCRYPT_DECRYPT",
                "keyState": "Enabled",
                "origin": "AWS_KMS",
                "keyManager": "CUSTOMER",
                "keySpec": "SYMMETRIC_DEFAULT",
                "encryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
                "multiRegion": False,
            }
        },
        "additional": None,
        "error_code": None,
        "error_message": None,
        "read_only": False,
        "material": {"material_id": MATERIAL_ID, "wrapped": WRAPPED_B64},
        "backing_version": 1,
    }


def crypto_used(
    key_id: str,
    operation: str = "Encrypt",
    *,
    at: datetime = BASE_TIME,
    version: int = 2,
    key_ref: str | None = None,
) -> dict[str, Any]:
    return {
        **_base("ApiCall.Succeeded", key_id, version, at),
        "call": _call(operation),
        "key_arn": key_arn(key_id),
        "request": {
            "keyId": key_ref or key_arn(key_id),
            "encryptionContext": {"Department": "Engineering"},
            "encryptionAlgorithm": "SYMMETRIC_DEFAULT",
        },
        "response": None,
        "additional": {"keyMaterialId": MATERIAL_ID},
        "error_code": None,
        "error_message": None,
        "read_only": True,
    }


def key_disabled(key_id: str, *, at: datetime = BASE_TIME, version: int = 2) -> dict[str, Any]:
    return {
        **_base("Key.Disabled", key_id, version, at),
        "call": _call("DisableKey"),
        "key_arn": key_arn(key_id),
        "request": {"keyId": key_id},
        "response": None,
        "additional": None,
        "error_code": None,
        "error_message": None,
        "read_only": False,
    }


def call_failed(
    key_id: str | None,
    operation: str = "Decrypt",
    *,
    error_code: str = "DisabledException",
    error_message: str = "The key is disabled.",
    at: datetime = BASE_TIME,
    key_ref: str = "alias/unknown",
) -> dict[str, Any]:
    return {
        **_base("ApiCall.Failed", key_id, 1, at),
        "call": _call(operation),
        "key_arn": key_arn(key_id) if key_id else None,
        "request": {"keyId": key_ref, "encryptionAlgorithm": "SYMMETRIC_DEFAULT"},
        "response": None,
        "additional": None,
        "error_code": error_code,
        "error_message": error_message,
        "read_only": True,
    }


def key_deleted_by_service(
    key_id: str, *, at: datetime = BASE_TIME, version: int = 3
) -> dict[str, Any]:
    return {
        **_base("Key.Deleted", key_id, version, at),
        "call": _call("DeleteKey", service=True),
        "key_arn": key_arn(key_id),
        "request": None,
        "response": None,
        "additional": None,
        "error_code": None,
        "error_message": None,
        "read_only": False,
    }


def mixed_events(n: int, *, keys: int = 5, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` events over ``keys`` keys: each key's CreateKey first, then a deterministic
    mix of Encrypt, Decrypt, DisableKey and failed calls, some without a key ARN.
    """
    key_ids = [str(uuid.UUID(int=seed * 1000 + i)) for i in range(keys)]
    versions = dict.fromkeys(key_ids, 0)
    events: list[dict[str, Any]] = []
    for i in range(n):
        at = BASE_TIME + timedelta(milliseconds=37 * i)
        if i < keys:
            key_id = key_ids[i]
            versions[key_id] = 1
            events.append(key_created(key_id, at=at))
            continue
        key_id = key_ids[(i * 3 + seed) % keys]
        kind = i % 11
        if kind == 10:
            events.append(call_failed(None, at=at))
            continue
        versions[key_id] += 1
        if kind == 9:
            events.append(call_failed(key_id, at=at))
        elif kind == 8:
            events.append(key_disabled(key_id, at=at, version=versions[key_id]))
        else:
            op = "Encrypt" if kind % 2 == 0 else "Decrypt"
            events.append(crypto_used(key_id, op, at=at, version=versions[key_id]))
    return events


class DoneFuture:
    """A send future that has already succeeded."""

    def get(self, timeout: float | None = None) -> None:
        return None


class RecordingProducer:
    """An ``AuditProducer`` that accepts every send at once and records, for each
    ``flush``, how many sends and value bytes were outstanding (no broker involved).
    """

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bytes | None, int]] = []  # topic, seq, key, size
        self.outstanding: list[tuple[int, int]] = []  # (sends, bytes) at each flush
        self._sends = 0
        self._bytes = 0

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> DoneFuture:
        seq = int(dict(headers or ())["seq"])
        self.sent.append((topic, seq, key, len(value or b"")))
        self._sends += 1
        self._bytes += len(value or b"")
        return DoneFuture()

    def flush(self, timeout: float | None = None) -> None:
        self.outstanding.append((self._sends, self._bytes))
        self._sends = self._bytes = 0

    def close(self, timeout: float | None = None) -> None:
        self.flush()
