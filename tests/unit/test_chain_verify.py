"""``verify_chain`` over synthetic rows: every tampering names its first bad position."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.chain import verify_chain
from ledger.errors import TamperError
from ledger.persistence import chain_rows
from ledger.records import GENESIS, canonical, record_hash

Row = dict[str, Any]
TOPICS = ("ledger.domain.model:Key.Created", "ledger.domain.model:Key.Disabled")


def make_log(size: int, *, nid_step: int = 3) -> tuple[list[Row], list[Row]]:
    """Event rows and chain rows for ``size`` records, formed as the recorders form them.

    Notification ids leave gaps (``nid_step``) so an event can be slipped in between.
    """
    stored, ids = [], []
    for i in range(size):
        originator = UUID(int=i // 2 + 1)
        record = {
            "originator_id": str(originator),
            "originator_version": i % 2 + 1,
            "topic": TOPICS[i % 2],
            "timestamp": f"2024-01-01T00:00:{i % 60:02d}+00:00",
            "request": {"n": i},
        }
        stored.append(
            StoredEvent(
                originator_id=originator,
                originator_version=i % 2 + 1,
                topic=TOPICS[i % 2],
                state=canonical(record),
            )
        )
        ids.append(nid_step * (i + 1))
    events = [
        {
            "nid": nid,
            "originator_id": ev.originator_id,
            "originator_version": ev.originator_version,
            "topic": ev.topic,
            "state": ev.state,
        }
        for nid, ev in zip(ids, stored, strict=True)
    ]
    chain = [
        {"seq": seq, "notification_id": nid, "record_hash": digest, "prev": prev}
        for seq, nid, digest, prev in chain_rows(0, GENESIS, ids, stored)
    ]
    return events, chain


def tamper_position(chain: list[Row], events: list[Row], **expect: Any) -> int:
    with pytest.raises(TamperError) as caught:
        verify_chain(chain, events, **expect)
    return caught.value.position


sizes = st.integers(min_value=1, max_value=12)


def test_an_untouched_log_verifies_with_its_count_and_head() -> None:
    events, chain = make_log(7)
    result = verify_chain(chain, events)
    assert result.count == 7
    assert result.head == record_hash(events[-1]["state"])
    assert result.head_hex == result.head.hex()
    assert verify_chain(chain, events, expect_count=7, expect_head=result.head) == result


def test_an_empty_log_verifies_with_genesis_as_head() -> None:
    result = verify_chain([], [])
    assert (result.count, result.head) == (0, GENESIS)


def test_verification_reads_memoryview_columns_as_the_database_returns_them() -> None:
    events, chain = make_log(3)
    for row in events:
        row["state"] = memoryview(row["state"])
        row["originator_id"] = row["originator_id"].hex
    for row in chain:
        row["record_hash"], row["prev"] = memoryview(row["record_hash"]), memoryview(row["prev"])
    assert verify_chain(iter(chain), iter(events)).count == 3


@settings(max_examples=200, deadline=None)
@given(size=sizes, data=st.data())
def test_any_single_byte_edit_of_a_stored_state_names_that_position(
    size: int, data: st.DataObject
) -> None:
    events, chain = make_log(size)
    i = data.draw(st.integers(0, size - 1), label="event")
    state = events[i]["state"]
    j = data.draw(st.integers(0, len(state) - 1), label="byte")
    delta = data.draw(st.integers(1, 255), label="xor")
    events[i]["state"] = state[:j] + bytes([state[j] ^ delta]) + state[j + 1 :]
    assert tamper_position(chain, events) == i + 1


@settings(max_examples=100, deadline=None)
@given(size=sizes, data=st.data())
def test_deleting_any_event_row_names_its_position(size: int, data: st.DataObject) -> None:
    events, chain = make_log(size)
    i = data.draw(st.integers(0, size - 1), label="event")
    del events[i]
    assert tamper_position(chain, events) == i + 1


@settings(max_examples=100, deadline=None)
@given(size=st.integers(2, 12), data=st.data())
def test_swapping_the_states_of_two_events_names_the_earlier_position(
    size: int, data: st.DataObject
) -> None:
    events, chain = make_log(size)
    i, j = sorted(
        data.draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=2, unique=True))
    )
    events[i]["state"], events[j]["state"] = events[j]["state"], events[i]["state"]
    assert tamper_position(chain, events) == i + 1


@settings(max_examples=100, deadline=None)
@given(size=st.integers(2, 12), data=st.data())
def test_reordering_two_event_rows_names_the_earlier_position(
    size: int, data: st.DataObject
) -> None:
    events, chain = make_log(size)
    i, j = sorted(
        data.draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=2, unique=True))
    )
    events[i], events[j] = events[j], events[i]
    assert tamper_position(chain, events) == i + 1


@settings(max_examples=100, deadline=None)
@given(size=st.integers(2, 12), data=st.data())
def test_renumbering_two_events_to_swap_their_order_names_the_earlier_position(
    size: int, data: st.DataObject
) -> None:
    events, chain = make_log(size)
    i, j = sorted(
        data.draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=2, unique=True))
    )
    events[i]["nid"], events[j]["nid"] = events[j]["nid"], events[i]["nid"]
    events.sort(key=lambda row: row["nid"])
    assert tamper_position(chain, events) == i + 1


@settings(max_examples=150, deadline=None)
@given(size=sizes, data=st.data())
def test_an_inserted_event_row_names_the_position_it_lands_on(
    size: int, data: st.DataObject
) -> None:
    events, chain = make_log(size, nid_step=3)
    at = data.draw(st.integers(0, size), label="insert before")
    donor = data.draw(st.sampled_from(events), label="copied from")
    extra = dict(donor, nid=3 * at + 1)  # between the neighbours' ids (3*at and 3*(at+1))
    events.insert(at, extra)
    assert tamper_position(chain, events) == at + 1


@settings(max_examples=100, deadline=None)
@given(size=sizes, data=st.data())
def test_deleting_any_chain_row_names_its_position(size: int, data: st.DataObject) -> None:
    events, chain = make_log(size)
    i = data.draw(st.integers(0, size - 1), label="chain row")
    del chain[i]
    assert tamper_position(chain, events) == i + 1


@settings(max_examples=100, deadline=None)
@given(size=sizes, data=st.data())
def test_editing_any_prev_link_names_its_position(size: int, data: st.DataObject) -> None:
    events, chain = make_log(size)
    i = data.draw(st.integers(0, size - 1), label="chain row")
    prev = chain[i]["prev"]
    j = data.draw(st.integers(0, len(prev) - 1), label="byte")
    chain[i]["prev"] = prev[:j] + bytes([prev[j] ^ 0x80]) + prev[j + 1 :]
    assert tamper_position(chain, events) == i + 1


@settings(max_examples=100, deadline=None)
@given(size=sizes, data=st.data())
def test_rewriting_a_record_and_its_hash_is_caught_at_the_next_link_or_the_head(
    size: int, data: st.DataObject
) -> None:
    events, chain = make_log(size)
    head = verify_chain(chain, events).head
    i = data.draw(st.integers(0, size - 1), label="event")
    events[i]["state"] = events[i]["state"].replace(b'"request":{', b'"request":{"x":1,')
    chain[i]["record_hash"] = record_hash(events[i]["state"])
    if i + 1 < size:
        assert tamper_position(chain, events) == i + 2
    else:
        assert verify_chain(chain, events).count == size
        assert tamper_position(chain, events, expect_head=head) == size


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("originator_id", UUID(int=999)),
        ("originator_version", 7),
        ("topic", "ledger.domain.model:Key.Enabled"),
    ],
)
def test_an_event_column_that_disagrees_with_the_bytes_names_its_position(
    column: str, value: Any
) -> None:
    events, chain = make_log(5)
    events[2][column] = value
    assert tamper_position(chain, events) == 3


def test_a_stored_state_that_is_not_a_record_names_its_position() -> None:
    events, chain = make_log(3)
    events[1]["state"] = b"not json"
    chain[1]["record_hash"] = record_hash(b"not json")
    chain[2]["prev"] = record_hash(b"not json")
    assert tamper_position(chain, events) == 2


@settings(max_examples=100, deadline=None)
@given(size=st.integers(2, 12), data=st.data())
def test_truncation_is_only_caught_with_an_expected_count_or_head(
    size: int, data: st.DataObject
) -> None:
    events, chain = make_log(size)
    head = verify_chain(chain, events).head
    keep = data.draw(st.integers(1, size - 1), label="records kept")
    del events[keep:], chain[keep:]

    assert verify_chain(chain, events).count == keep
    assert tamper_position(chain, events, expect_count=size) == keep + 1
    assert tamper_position(chain, events, expect_head=head) == keep


def test_a_log_longer_than_the_expected_count_names_the_first_extra_position() -> None:
    events, chain = make_log(5)
    assert tamper_position(chain, events, expect_count=3) == 4


def test_truncating_every_record_is_caught_with_an_expected_count() -> None:
    assert verify_chain([], []).count == 0
    assert tamper_position([], [], expect_count=4) == 1


def test_truncating_every_record_is_caught_with_an_expected_head_at_position_one() -> None:
    events, chain = make_log(4)
    head = verify_chain(chain, events).head
    assert tamper_position([], [], expect_head=head) == 1
