"""The Splunk HEC view of published envelopes, and the HEC client's input checks."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from consumers.cloudtrail import cloudtrail_record
from consumers.hec import SOURCETYPE, HecClient, as_hec_event, hec_event
from ledger.errors import ValidationError
from tests.fakes_relay import (
    MATERIAL_ID,
    WRAPPED_B64,
    WRAPPED_MARKER,
    InMemoryLedger,
    crypto_used,
    key_created,
    mixed_events,
)

LEDGER_ID = "ledger-hec-test"
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"


def _envelopes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ledger = InMemoryLedger()
    ledger.extend(events)
    return [
        cloudtrail_record(
            r.event(), seq=r.seq, record_hash=r.record_hash, prev=r.prev, ledger_id=LEDGER_ID
        )
        for r in ledger.read_records(0, len(events))
    ]


def test_hec_event_has_exactly_the_collector_envelope_keys() -> None:
    (envelope,) = _envelopes([crypto_used(KEY_ID)])
    event = hec_event(envelope)
    assert set(event) == {"time", "host", "source", "sourcetype", "event", "fields"}
    assert event["sourcetype"] == SOURCETYPE == "aws:cloudtrail"
    assert event["source"] == f"keyledger:{LEDGER_ID}"
    assert event["host"] == "keyledger"
    assert hec_event(envelope, host="kl-1")["host"] == "kl-1"


def test_hec_event_carries_the_cloudtrail_record_unchanged() -> None:
    (envelope,) = _envelopes([crypto_used(KEY_ID)])
    assert hec_event(envelope)["event"] == envelope["record"]


def test_hec_fields_map_the_copy_back_to_its_ledger_record() -> None:
    envelopes = _envelopes(mixed_events(30))
    for envelope in envelopes:
        fields = hec_event(envelope)["fields"]
        assert fields == {
            "seq": envelope["seq"],
            "recordHash": envelope["recordHash"],
            "ledger": LEDGER_ID,
        }
    assert [hec_event(e)["fields"]["seq"] for e in envelopes] == list(range(1, 31))


def test_hec_indexed_fields_are_flat_strings_or_numbers() -> None:
    for envelope in _envelopes(mixed_events(40)):
        for value in hec_event(envelope)["fields"].values():
            assert isinstance(value, str | int) and not isinstance(value, bool)


def test_hec_time_is_the_event_time_in_epoch_seconds() -> None:
    at = datetime(2026, 11, 25, 1, 55, 7, 987654, tzinfo=UTC)
    (envelope,) = _envelopes([crypto_used(KEY_ID, at=at)])
    assert envelope["record"]["eventTime"] == "2026-11-25T01:55:07Z"
    event = hec_event(envelope)
    assert event["time"] == int(datetime(2026, 11, 25, 1, 55, 7, tzinfo=UTC).timestamp())
    assert isinstance(event["time"], int)


def test_hec_time_respects_a_non_utc_offset() -> None:
    (envelope,) = _envelopes([crypto_used(KEY_ID)])
    envelope["record"]["eventTime"] = "2026-11-25T03:55:07+02:00"
    assert hec_event(envelope)["time"] == int(
        datetime(2026, 11, 25, 1, 55, 7, tzinfo=UTC).timestamp()
    )


def test_hec_event_does_not_carry_wrapped_material_or_unknown_envelope_keys() -> None:
    envelopes = _envelopes([key_created(KEY_ID), crypto_used(KEY_ID)])
    for envelope in envelopes:
        envelope["debug"] = {"plaintext": "c2VjcmV0"}
        body = orjson.dumps(hec_event(envelope))
        assert WRAPPED_MARKER not in body
        assert WRAPPED_B64.encode() not in body
        assert b"c2VjcmV0" not in body
        assert b"prev" not in body
    # The material id is published as AWS publishes keyMaterialId; the material is not.
    assert MATERIAL_ID.encode() in orjson.dumps(hec_event(envelopes[1]))


@pytest.mark.parametrize("missing", ["ledger", "seq", "recordHash", "record"])
def test_hec_event_rejects_an_envelope_without_a_required_part(missing: str) -> None:
    (envelope,) = _envelopes([crypto_used(KEY_ID)])
    del envelope[missing]
    with pytest.raises(KeyError):
        hec_event(envelope)


def test_hec_event_rejects_a_seq_that_is_not_an_integer() -> None:
    (envelope,) = _envelopes([crypto_used(KEY_ID)])
    envelope["seq"] = "1"
    with pytest.raises(TypeError):
        hec_event(envelope)


def test_hec_event_rejects_an_event_time_without_offset() -> None:
    (envelope,) = _envelopes([crypto_used(KEY_ID)])
    envelope["record"]["eventTime"] = "2026-11-25T01:55:07"
    with pytest.raises(ValueError, match="offset"):
        hec_event(envelope)


def test_a_value_that_already_is_the_hec_view_is_forwarded_unchanged() -> None:
    (envelope,) = _envelopes([crypto_used(KEY_ID)])
    event = hec_event(envelope)
    assert as_hec_event(orjson.loads(orjson.dumps(event))) == event
    assert as_hec_event(envelope) == event
    with pytest.raises(KeyError):
        as_hec_event({"event": {}, "sourcetype": SOURCETYPE})


TOKEN = "11111111-2222-3333-4444-555555555555"


@pytest.mark.parametrize(
    "token", ["", "has space", "tab\there", "line\r\nX-Injected: 1", "caf\u00e9"]
)
def test_hec_client_rejects_a_malformed_token_without_echoing_it(token: str) -> None:
    with pytest.raises(ValidationError) as info:
        HecClient("https://splunk.example:8088", token)
    if token:
        assert token not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://splunk.example/services/collector/event",
        "https:///services/collector/event",
        f"https://user:{TOKEN}@splunk.example:8088/services/collector/event",
    ],
)
def test_hec_client_rejects_a_url_it_cannot_use_safely(url: str) -> None:
    with pytest.raises(ValidationError) as info:
        HecClient(url, TOKEN)
    assert TOKEN not in str(info.value)


def test_hec_client_repr_and_logs_never_show_the_token(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        client = HecClient("http://splunk.example:8088", TOKEN)
    assert TOKEN not in repr(client)
    assert "/services/collector/event" in repr(client)
    assert TOKEN not in caplog.text
    assert "clear text" in caplog.text
