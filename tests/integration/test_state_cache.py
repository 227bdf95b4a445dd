"""Cached keys and principals are brought up to date by the state version, not by a
query per aggregate per call: a change committed by another process (a CLI command,
another worker) is seen within ``STATE_RECHECK_SECONDS``, this process's own changes at
once, and while nothing changes no call reads any aggregate's events."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from ledger import service
from ledger.bootstrap import open_ledger
from ledger.errors import DisabledError
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")


@pytest.fixture
def other(ledger_settings: Settings, softhsm_keystore: Pkcs11KeyStore) -> Iterator[KeyLedger]:
    """A second KeyLedger on the same database: another process, as far as caches go."""
    app = open_ledger(ledger_settings, keystore=softhsm_keystore)
    yield app
    app.close()


def _encrypt(app: KeyLedger, key: str) -> Any:
    return app.encrypt(caller=CALLER, key_id=key, plaintext=b"x")


def _count_event_reads(app: KeyLedger, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the originator of every event-store read ``app`` makes from now on."""
    reads: list[Any] = []
    real = app.events.get

    def counting(*args: Any, **kwargs: Any) -> Any:
        reads.append(kwargs.get("originator_id", args[0] if args else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(app.events, "get", counting)
    return reads


def test_state_version_counts_changes_of_state_not_recorded_calls(ledger: KeyLedger) -> None:
    v0 = ledger.db.state_version()
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    v1 = ledger.db.state_version()
    assert v1 == v0 + 1
    _encrypt(ledger, key)
    with pytest.raises(DisabledError):
        ledger.disable_key(caller=CALLER, key_id=key)
        _encrypt(ledger, key)  # a failed call: recorded, changes nothing
    assert ledger.db.state_version() == v1 + 1  # the disable only


def test_another_process_change_is_seen_within_the_recheck_window(
    ledger: KeyLedger, other: KeyLedger
) -> None:
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    _encrypt(ledger, key)  # cached in ledger
    other.disable_key(caller=CALLER, key_id=key)
    time.sleep(service.STATE_RECHECK_SECONDS * 4)
    with pytest.raises(DisabledError):
        _encrypt(ledger, key)
    other.enable_key(caller=CALLER, key_id=key)
    time.sleep(service.STATE_RECHECK_SECONDS * 4)
    assert _encrypt(ledger, key)["CiphertextBlob"]


def test_own_change_is_seen_at_once(ledger: KeyLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    _encrypt(ledger, key)
    # However long the window, a change this process saved counts on the next call.
    monkeypatch.setattr(service, "STATE_RECHECK_SECONDS", 3600.0)
    _encrypt(ledger, key)
    ledger.disable_key(caller=CALLER, key_id=key)
    with pytest.raises(DisabledError):
        _encrypt(ledger, key)


def test_calls_read_no_events_while_nothing_changes(
    ledger: KeyLedger, other: KeyLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    _encrypt(ledger, key)
    monkeypatch.setattr(service, "STATE_RECHECK_SECONDS", 0.0)  # read the version every call
    reads = _count_event_reads(ledger, monkeypatch)
    for _ in range(20):
        _encrypt(ledger, key)
    assert reads == []
    other.disable_key(caller=CALLER, key_id=key)
    with pytest.raises(DisabledError):
        _encrypt(ledger, key)
    assert reads, "a change of state must bring the cached key up to date"


def test_recorded_calls_are_told_apart_by_their_topic() -> None:
    from eventsourcing.utils import get_topic

    from ledger.domain.model import ApiCall, Key
    from ledger.persistence import _CALL_TOPIC_PREFIX

    for event in (ApiCall.Succeeded, ApiCall.Failed):
        assert get_topic(event).startswith(_CALL_TOPIC_PREFIX)
    assert not get_topic(Key.Created).startswith(_CALL_TOPIC_PREFIX)
