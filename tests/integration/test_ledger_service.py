"""The KMS operations service on real SoftHSM2, on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from ledger.chain import verify_chain
from ledger.errors import (
    DisabledError,
    IncorrectKeyError,
    InvalidCiphertextError,
    KeyLedgerError,
    LedgerUnavailableError,
    NotFoundError,
    ValidationError,
)
from ledger.service import Caller, KeyLedger
from projections.catalog import KeyCatalog

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root", source_ip="127.0.0.1")
CTX = {"purpose": "test", "tenant": "acme"}


def new_key(ledger: KeyLedger, description: str = "") -> dict[str, Any]:
    md: dict[str, Any] = ledger.create_key(caller=CALLER, description=description)["KeyMetadata"]
    return md


def events(ledger: KeyLedger) -> list[dict[str, Any]]:
    return [r.event() for r in ledger.db.read_records(0, 100_000)]


@pytest.mark.parametrize("size", [1, 4096])
def test_encrypt_decrypt_round_trip_with_context(ledger: KeyLedger, size: int) -> None:
    key = new_key(ledger)
    plaintext = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    enc = ledger.encrypt(
        caller=CALLER, key_id=key["KeyId"], plaintext=plaintext, encryption_context=CTX
    )
    assert enc["KeyId"] == key["Arn"]
    assert enc["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    if size > 16:
        assert plaintext not in enc["CiphertextBlob"]
    # KeyId is optional for symmetric keys; key id and ARN both work when given.
    for key_id in (None, key["KeyId"], key["Arn"]):
        dec = ledger.decrypt(
            caller=CALLER,
            ciphertext_blob=enc["CiphertextBlob"],
            key_id=key_id,
            encryption_context=dict(reversed(list(CTX.items()))),
        )
        assert dec["Plaintext"] == plaintext
        assert dec["KeyId"] == key["Arn"]


def test_every_call_is_recorded_with_caller_context_and_outcome(ledger: KeyLedger) -> None:
    key = new_key(ledger, "recorded")
    blob = ledger.encrypt(
        caller=CALLER, key_id=key["KeyId"], plaintext=b"x", encryption_context=CTX
    )["CiphertextBlob"]
    ledger.decrypt(caller=CALLER, ciphertext_blob=blob, encryption_context=CTX)
    evs = events(ledger)
    assert [e["call"]["operation"] for e in evs] == ["CreateKey", "Encrypt", "Decrypt"]
    for e in evs:
        assert e["call"]["principal"] == CALLER.principal
        assert e["call"]["source_ip"] == "127.0.0.1"
        assert e["key_arn"] == key["Arn"]
        assert e.get("error_code") is None
        assert e["timestamp"]
    assert len({e["call"]["request_id"] for e in evs}) == 3
    assert evs[1]["request"] == {
        "keyId": key["KeyId"],
        "encryptionContext": CTX,
        "encryptionAlgorithm": "SYMMETRIC_DEFAULT",
    }
    assert "keyId" not in evs[2]["request"]


def _bad_inputs(ledger: KeyLedger) -> list[tuple[str, type[KeyLedgerError], Any]]:
    key = new_key(ledger)
    other = new_key(ledger)
    disabled = new_key(ledger)
    blob = ledger.encrypt(
        caller=CALLER, key_id=key["KeyId"], plaintext=b"secret", encryption_context=CTX
    )["CiphertextBlob"]
    other_blob = ledger.encrypt(
        caller=CALLER, key_id=other["KeyId"], plaintext=b"secret", encryption_context=CTX
    )["CiphertextBlob"]
    disabled_blob = ledger.encrypt(
        caller=CALLER, key_id=disabled["KeyId"], plaintext=b"secret", encryption_context=CTX
    )["CiphertextBlob"]
    ledger.disable_key(caller=CALLER, key_id=disabled["KeyId"])
    flipped = [bytearray(blob) for _ in range(4)]
    for i, pos in enumerate((0, 5, 25, len(blob) - 1)):
        flipped[i][pos] ^= 0x01
    unknown = "00000000-0000-4000-8000-000000000000"

    def enc(**kw: Any) -> Any:
        return lambda: ledger.encrypt(caller=CALLER, **kw)

    def dec(**kw: Any) -> Any:
        return lambda: ledger.decrypt(caller=CALLER, **kw)

    cases: list[tuple[str, type[KeyLedgerError], Any]] = [
        ("unknown key", NotFoundError, enc(key_id=unknown, plaintext=b"x")),
        ("malformed key id", NotFoundError, enc(key_id="not-a-key", plaintext=b"x")),
        ("disabled key encrypt", DisabledError, enc(key_id=disabled["KeyId"], plaintext=b"x")),
        (
            "disabled key decrypt",
            DisabledError,
            dec(ciphertext_blob=disabled_blob, encryption_context=CTX),
        ),
        (
            "wrong context",
            InvalidCiphertextError,
            dec(ciphertext_blob=blob, encryption_context={"purpose": "other", "tenant": "acme"}),
        ),
        ("missing context", InvalidCiphertextError, dec(ciphertext_blob=blob)),
        (
            "extra context",
            InvalidCiphertextError,
            dec(ciphertext_blob=blob, encryption_context={**CTX, "x": "y"}),
        ),
        (
            "truncated blob",
            InvalidCiphertextError,
            dec(ciphertext_blob=blob[:-1], encryption_context=CTX),
        ),
        (
            "short blob",
            InvalidCiphertextError,
            dec(ciphertext_blob=blob[:20], encryption_context=CTX),
        ),
        (
            "ciphertext of another key",
            IncorrectKeyError,
            dec(ciphertext_blob=other_blob, key_id=key["KeyId"], encryption_context=CTX),
        ),
        (
            "plaintext over 4096 bytes",
            ValidationError,
            enc(key_id=key["KeyId"], plaintext=b"x" * 4097),
        ),
        ("empty plaintext", ValidationError, enc(key_id=key["KeyId"], plaintext=b"")),
        (
            "non-string context",
            ValidationError,
            enc(key_id=key["KeyId"], plaintext=b"x", encryption_context={"a": 1}),
        ),
    ]
    for i, f in enumerate(flipped):
        cases.append(
            (
                f"flipped byte {i}",
                InvalidCiphertextError,
                dec(ciphertext_blob=bytes(f), encryption_context=CTX),
            )
        )
    return cases


def test_each_bad_input_fails_with_its_aws_error_and_adds_exactly_one_failure_record(
    ledger: KeyLedger,
) -> None:
    cases = _bad_inputs(ledger)
    catalog = KeyCatalog(ledger.db)
    catalog.catch_up()
    for name, error, attempt in cases:
        before_seq = ledger.db.head_seq()
        catalog.catch_up()
        before_state = catalog.snapshot()
        with pytest.raises(error) as info:
            attempt()
        new = ledger.db.read_records(before_seq, 100)
        assert len(new) == 1, name
        record = new[0].event()
        assert record["topic"].endswith("ApiCall.Failed"), name
        assert record["error_code"] == info.value.aws_name == error.aws_name, name
        catalog.catch_up()
        assert catalog.snapshot() == before_state, name
    verify_chain(ledger.db.iter_chain(), ledger.db.iter_events())


def test_invalid_ciphertext_errors_carry_no_detail(ledger: KeyLedger) -> None:
    key = new_key(ledger)
    blob = ledger.encrypt(
        caller=CALLER, key_id=key["KeyId"], plaintext=b"p", encryption_context=CTX
    )["CiphertextBlob"]
    messages = set()
    for bad in (blob[:-1], blob[:10], b"\x02" + blob[1:]):
        with pytest.raises(InvalidCiphertextError) as info:
            ledger.decrypt(caller=CALLER, ciphertext_blob=bad, encryption_context=CTX)
        messages.add(str(info.value))
    with pytest.raises(InvalidCiphertextError) as info:
        ledger.decrypt(caller=CALLER, ciphertext_blob=blob, encryption_context={"a": "b"})
    messages.add(str(info.value))
    assert messages == {""}


def test_disable_and_enable_change_state_in_ledger_and_catalog(ledger: KeyLedger) -> None:
    key = new_key(ledger, "toggle")
    catalog = KeyCatalog(ledger.db)
    ledger.disable_key(caller=CALLER, key_id=key["Arn"])
    md = catalog.describe_key(__import__("uuid").UUID(key["KeyId"]), key["Arn"])["KeyMetadata"]
    assert (md["KeyState"], md["Enabled"]) == ("Disabled", False)
    with pytest.raises(DisabledError, match="is disabled"):
        ledger.encrypt(caller=CALLER, key_id=key["KeyId"], plaintext=b"x")
    ledger.enable_key(caller=CALLER, key_id=key["KeyId"])
    md = catalog.describe_key(__import__("uuid").UUID(key["KeyId"]), key["Arn"])["KeyMetadata"]
    assert (md["KeyState"], md["Enabled"]) == ("Enabled", True)
    assert ledger.encrypt(caller=CALLER, key_id=key["KeyId"], plaintext=b"x")["KeyId"] == key["Arn"]
    assert md["Description"] == "toggle"
    assert md["KeySpec"] == "SYMMETRIC_DEFAULT" and md["KeyUsage"] == "ENCRYPT_DECRYPT"


def test_catalog_rebuild_gives_the_same_result_as_incremental_catch_up(ledger: KeyLedger) -> None:
    keys = [new_key(ledger, f"k{i}") for i in range(5)]
    catalog = KeyCatalog(ledger.db, batch_size=2)
    catalog.catch_up()
    ledger.disable_key(caller=CALLER, key_id=keys[1]["KeyId"])
    ledger.disable_key(caller=CALLER, key_id=keys[2]["KeyId"])
    ledger.enable_key(caller=CALLER, key_id=keys[2]["KeyId"])
    catalog.catch_up()
    incremental = catalog.snapshot()
    assert catalog.rebuild() == ledger.db.head_seq()
    assert catalog.snapshot() == incremental
    listed = catalog.list_keys(limit=2)
    assert listed["Truncated"] and len(listed["Keys"]) == 2
    rest = catalog.list_keys(marker=listed["NextMarker"])
    all_ids = [k["KeyId"] for k in listed["Keys"] + rest["Keys"]]
    assert sorted(all_ids) == sorted(k["KeyId"] for k in keys)


def test_describe_unknown_key_is_not_found(ledger: KeyLedger) -> None:
    catalog = KeyCatalog(ledger.db)
    unknown = __import__("uuid").uuid4()
    with pytest.raises(NotFoundError, match="does not exist"):
        catalog.describe_key(unknown, ledger.settings.key_arn(str(unknown)))


def test_no_result_is_returned_when_the_ledger_cannot_commit(ledger: KeyLedger) -> None:
    key = new_key(ledger)
    before = ledger.db.head_seq()
    with ledger.db.transaction(commit=True) as c:  # break the chain table for real
        c.execute("ALTER TABLE {chain} RENAME TO kl_chain_moved")
    try:
        with pytest.raises(LedgerUnavailableError):
            ledger.encrypt(caller=CALLER, key_id=key["KeyId"], plaintext=b"must not leak")
    finally:
        with ledger.db.transaction(commit=True) as c:
            c.execute(f"ALTER TABLE {ledger.db.table('kl_chain_moved')} RENAME TO kl_chain")
    assert ledger.db.head_seq() == before
    assert verify_chain(ledger.db.iter_chain(), ledger.db.iter_events()).count == before
