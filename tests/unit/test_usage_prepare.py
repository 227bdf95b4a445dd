"""The usage index's fast decoder (msgspec structs of the fields it reads) gives
exactly what decoding each whole event to a dict gives, for every event shape: the
ledger's own events, odd types, nulls, missing fields, NUL, timestamps in other forms."""

from __future__ import annotations

import pickle
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projections.usage import (
    COLUMNS,
    TABLE_COLUMNS,
    epoch_us,
    name_number,
    prepare,
    prepare_reference,
)

TS = "2026-11-01T12:34:56.789012+00:00"

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
texts = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["", "a\x00b", "é☃"]))
field_value = st.one_of(texts, json_values)
contexts = st.one_of(
    st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
    st.dictionaries(st.text(max_size=4), json_values, max_size=2),
    json_values,
)


def _maybe(d: dict[str, Any], draw: Any, key: str, strategy: Any) -> None:
    if draw(st.booleans()):
        d[key] = draw(strategy)


@st.composite
def events(draw: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "timestamp": draw(
            st.one_of(
                st.just(TS),
                st.just("2026-11-01T12:34:56+00:00"),  # isoformat() drops zero microseconds
                st.just("2026-11-01T23:59:59.999999+02:00"),
                st.just("2026-11-01 12:34:56.789012+00:00"),
                st.just("2026-11-01T12:34:56.789012Z"),
            )
        )
    }
    _maybe(
        event,
        draw,
        "topic",
        st.one_of(
            st.sampled_from(
                [
                    "ledger.domain.model:ApiCall.Succeeded",
                    "ledger.domain.model:Alias.Created",
                    "ledger.domain.model:Key.Deleted",
                    "Alias.Updated",
                    "ledger.domain.model:",
                ]
            ),
            field_value,
        ),
    )
    call_fields = ["operation", "principal", "account_id", "region", "source_ip"]
    call_fields += ["user_agent", "request_id", "other"]
    call: dict[str, Any] = {}
    for name in call_fields:
        _maybe(call, draw, name, texts)
    _maybe(event, draw, "call", st.one_of(st.just(call), st.none(), st.just({})))
    request: dict[str, Any] = {}
    for name in ("keyId", "destinationKeyId", "targetKeyId", "encryptionAlgorithm"):
        _maybe(request, draw, name, field_value)
    for name in ("signingAlgorithm", "macAlgorithm", "keyPairSpec", "keySpec", "grantTokens"):
        _maybe(request, draw, name, field_value)
    for name in ("encryptionContext", "destinationEncryptionContext"):
        _maybe(request, draw, name, contexts)
    _maybe(event, draw, "request", st.one_of(st.just(request), st.none(), st.just([])))
    _maybe(
        event,
        draw,
        "additional",
        st.one_of(st.none(), st.just({"sourceKeyArn": "arn:k"}), json_values),
    )
    _maybe(event, draw, "key_arn", texts)
    _maybe(event, draw, "error_code", texts)
    _maybe(event, draw, "response", json_values)
    return event


def _outcome(fn: Any, records: list[tuple[int, bytes]], for_postgres: bool) -> Any:
    try:
        return fn(records, for_postgres=for_postgres)
    except Exception as e:  # the same exception type for a record that is no event
        return type(e)


@settings(max_examples=400, deadline=None)
@given(st.lists(events(), min_size=1, max_size=6), st.booleans())
def test_fast_prepare_equals_the_reference(batch: list[dict[str, Any]], pg: bool) -> None:
    records = [(i + 1, orjson.dumps(e)) for i, e in enumerate(batch)]
    assert _outcome(prepare, records, pg) == _outcome(prepare_reference, records, pg)


def test_the_ledgers_own_event_shape_takes_the_fast_path() -> None:
    event = {
        "additional": {"keyMaterialId": "m", "sourceKeyArn": "arn:src"},
        "call": {
            "account_id": "111122223333",
            "operation": "ReEncrypt",
            "principal": "arn:aws:iam::111122223333:user/u",
            "region": "us-east-1",
            "request_id": "r-1",
            "source_ip": "10.0.0.1",
            "user_agent": "Boto3",
        },
        "error_code": None,
        "key_arn": "arn:dst",
        "request": {
            "destinationKeyId": "alias/dst",
            "destinationEncryptionContext": {"b": "2", "a": "1"},
            "encryptionContext": {"a": "1"},
        },
        "timestamp": TS,
        "topic": "ledger.domain.model:ApiCall.Succeeded",
    }
    rows, pairs, aliases = prepare([(7, orjson.dumps(event))])
    row = dict(zip(TABLE_COLUMNS, rows[0], strict=True))
    assert row["key_no"] == name_number("arn:dst")
    assert row["principal_no"] == name_number("arn:aws:iam::111122223333:user/u")
    assert row["ts"] == epoch_us(TS)
    assert row["kind"] == "ApiCall.Succeeded"
    assert row["source_key_arn"] == "arn:src"
    assert row["key_sent"] == "alias/dst"
    assert row["context"] == '{"a":"1"}'  # the first context given, sorted, compact
    assert pairs == [("1:a=1", 7), ("1:b=2", 7)]  # one row per distinct pair
    assert aliases == []
    assert (rows, pairs, aliases) == prepare_reference([(7, orjson.dumps(event))])


def test_alias_events_are_handed_over_whole() -> None:
    event = {
        "timestamp": TS,
        "topic": "ledger.domain.model:Alias.Created",
        "originator_id": "a-1",
        "alias_arn": "arn:aws:kms:us-east-1:1:alias/x",
        "target_key_id": "k",
    }
    _, _, aliases = prepare([(3, orjson.dumps(event))])
    assert aliases == [(3, event)]


def test_repeated_values_are_one_object_so_results_pickle_small() -> None:
    event = {"timestamp": TS, "call": {"principal": "arn:aws:iam::1:user/" + "p" * 200}}
    records = [(i, orjson.dumps(event)) for i in range(1, 101)]
    rows, _, _ = prepare(records)
    principal = COLUMNS.index("principal")
    assert len({id(r[principal]) for r in rows}) == 1
    assert len(pickle.dumps(rows)) < 100 * 200


@pytest.mark.parametrize(
    "iso",
    [
        TS,
        "1970-01-01T00:00:00.000001+00:00",
        "1969-12-31T23:59:59.500000+00:00",  # before 1970: epoch_us truncates to zero
        "2024-02-29T23:59:59.999999+00:00",
        "2026-11-01T12:34:56+00:00",
        "2026-11-01T12:34:56.789012+05:30",
        "2026-11-01T12:34:56.789012-00:00",
        "2026-11-01T12:34:5a.789012+00:00",
        "2026-11-01T12:34:60.789012+00:00",
        "2026-11-01T12:61:56.789012+00:00",
        "2026-11-01T12:34:56.78901²+00:00",
        "2026-11-01T12:34:56.7890 1+00:00",
        "2026-13-01T12:34:56.789012+00:00",
    ],
)
def test_timestamps_give_epoch_us_or_its_error(iso: str) -> None:
    event = {"timestamp": iso, "topic": "ledger.domain.model:ApiCall.Succeeded"}
    records = [(1, orjson.dumps(event)), (2, orjson.dumps(event))]  # cold, then cached
    try:
        expected: Any = epoch_us(iso)
    except ValueError:
        expected = ValueError
    got = _outcome(prepare, records, False)
    assert got == _outcome(prepare_reference, records, False)
    if expected is ValueError:
        assert got is ValueError
    else:
        assert [r[COLUMNS.index("ts")] for r in got[0]] == [expected, expected]


@pytest.mark.parametrize(
    ("iso", "day", "hour"),
    [
        ("2026-10-01T23:59:59.999999+00:00", "2026-10-01", "2026-10-01T23"),
        ("2026-10-02T00:00:00+00:00", "2026-10-02", "2026-10-02T00"),
        ("2026-10-02T01:30:00+02:00", "2026-10-01", "2026-10-01T23"),  # UTC periods
        ("1970-01-01T00:00:00.000001+00:00", "1970-01-01", "1970-01-01T00"),
    ],
)
def test_stats_periods_are_utc_days_and_hours(iso: str, day: str, hour: str) -> None:
    from projections.usage import period_number, period_text

    us = epoch_us(iso)
    assert period_text("day", period_number("day", us)) == day
    assert period_text("hour", period_number("hour", us)) == hour


def test_name_numbers_are_fixed() -> None:
    """Stored indexes hold these numbers: another function would need a rebuild."""
    assert name_number("arn:aws:kms:us-east-1:111122223333:key/k") == name_number(
        "arn:aws:kms:us-east-1:111122223333:key/k"
    )
    assert name_number("") == -1970711489451281740  # BLAKE2b, 8 bytes, big-endian
    assert name_number("arn:aws:iam::111122223333:root") != name_number(
        "arn:aws:iam::111122223333:root "
    )
