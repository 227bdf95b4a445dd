"""The ``Key`` aggregate: its events, versions and state, and their canonical storage."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson
import pytest
from eventsourcing.domain import DomainEventProtocol
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ledger.domain.model import DISABLED, ENABLED, CallContext, Key, material_from_json
from ledger.errors import KMSInvalidStateError
from ledger.keystore.port import MaterialRef
from ledger.persistence import CanonicalMapper
from ledger.records import canonical

KEY_ID = UUID("1234abcd-12ab-34cd-56ef-1234567890ab")
ARN = f"arn:aws:kms:eu-west-1:111122223333:key/{KEY_ID}"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
MATERIAL = MaterialRef(material_id="ab" * 32, wrapped=bytes(range(40)))
MAPPER = CanonicalMapper()

plain_text = st.text(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | plain_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(plain_text, children, max_size=3)
    ),
    max_leaves=8,
)
requests = st.dictionaries(plain_text, json_values, max_size=4)
timestamps = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


def call(operation: str, n: int = 0) -> CallContext:
    return CallContext(
        operation=operation,
        request_id=str(UUID(int=n + 1)),
        principal="arn:aws:iam::111122223333:user/alice",
        region="eu-west-1",
        account_id="111122223333",
        source_ip="192.0.2.1",
    )


def new_key(
    *,
    timestamp: datetime = T0,
    description: str = "test key",
    request: dict[str, Any] | None = None,
) -> Key:
    return Key.create(
        key_id=KEY_ID,
        arn=ARN,
        call=call("CreateKey"),
        timestamp=timestamp,
        description=description,
        key_spec="SYMMETRIC_DEFAULT",
        key_usage="ENCRYPT_DECRYPT",
        origin="AWS_KMS",
        material=MATERIAL,
        request={"Description": description} if request is None else request,
    )


def assert_round_trips(event: DomainEventProtocol[UUID]) -> None:
    """Stored bytes are canonical, decode to an equal event, and re-encode identically."""
    stored = MAPPER.to_stored_event(event)
    # RFC 8785 order (UTF-16 code units), not code point order: see ledger.records.
    assert canonical(orjson.loads(stored.state)) == stored.state
    record = orjson.loads(stored.state)
    assert record["originator_id"] == str(event.originator_id) == str(stored.originator_id)
    assert record["originator_version"] == event.originator_version == stored.originator_version
    assert record["topic"] == stored.topic
    decoded = MAPPER.to_domain_event(stored)
    assert type(decoded) is type(event)
    assert vars(decoded) == vars(event)
    assert MAPPER.to_stored_event(decoded).state == stored.state


def test_create_records_one_created_event_at_version_one() -> None:
    key = new_key()
    events = key.collect_events()
    assert [type(e) for e in events] == [Key.Created]
    created = events[0]
    assert isinstance(created, Key.Created)
    assert (created.originator_id, created.originator_version) == (KEY_ID, 1)
    assert created.timestamp == T0
    assert created.key_arn == ARN
    assert created.additional == {"keyMaterialId": MATERIAL.material_id}
    assert created.response is not None
    assert created.response["keyMetadata"]["keyState"] == ENABLED
    assert material_from_json(created.material) == MATERIAL


def test_a_new_key_is_enabled_with_one_backing_key_version() -> None:
    key = new_key()
    assert (key.id, key.version, key.key_state, key.enabled) == (KEY_ID, 1, ENABLED, True)
    assert (key.key_id, key.arn, key.description) == (str(KEY_ID), ARN, "test key")
    assert key.version_number == 1
    assert key.current_material == MATERIAL
    assert key.material_version(1) == MATERIAL


@pytest.mark.parametrize("version", [0, 2, -1])
def test_an_unknown_backing_key_version_raises_key_error(version: int) -> None:
    with pytest.raises(KeyError):
        new_key().material_version(version)


def test_disable_then_enable_records_one_event_each_with_the_next_version() -> None:
    key = new_key()
    key.disable(call=call("DisableKey", 1), timestamp=T0 + timedelta(seconds=1), request={})
    assert (key.version, key.key_state, key.enabled) == (2, DISABLED, False)
    key.enable(call=call("EnableKey", 2), timestamp=T0 + timedelta(seconds=2), request={})
    assert (key.version, key.key_state, key.enabled) == (3, ENABLED, True)
    events = key.collect_events()
    assert [type(e) for e in events] == [Key.Created, Key.Disabled, Key.Enabled]
    assert [e.originator_version for e in events] == [1, 2, 3]
    disabled = events[1]
    assert isinstance(disabled, Key.Disabled)
    assert (disabled.key_arn, disabled.response, disabled.read_only) == (ARN, None, False)
    assert disabled.call["operation"] == "DisableKey"
    assert key.version_number == 1  # enable/disable never add a backing key


@pytest.mark.parametrize("command", ["enable", "disable"])
def test_enable_and_disable_raise_invalid_state_when_the_key_is_pending_deletion(
    command: str,
) -> None:
    key = new_key()
    key.collect_events()
    key.key_state = "PendingDeletion"  # stands in for a scheduled deletion
    with pytest.raises(KMSInvalidStateError):
        getattr(key, command)(call=call("X"), timestamp=T0, request={})
    assert key.collect_events() == []
    assert key.version == 1


def test_material_ref_repr_does_not_contain_the_wrapped_bytes() -> None:
    text = repr(MATERIAL)
    assert MATERIAL.material_id in text
    for form in (
        repr(MATERIAL.wrapped),
        MATERIAL.wrapped.hex(),
        base64.b64encode(MATERIAL.wrapped).decode(),
    ):
        assert form not in text
    assert "wrapped" not in text


@settings(max_examples=100, deadline=None)
@given(timestamp=timestamps, description=st.text(max_size=40), request=requests)
def test_created_event_round_trips_through_the_canonical_mapper(
    timestamp: datetime, description: str, request: dict[str, Any]
) -> None:
    key = new_key(timestamp=timestamp, description=description, request=request)
    key.disable(call=call("DisableKey"), timestamp=timestamp, request=request)
    for event in key.collect_events():
        assert_round_trips(event)


def test_stored_state_holds_the_material_wrapped_only_as_base64() -> None:
    stored = MAPPER.to_stored_event(new_key().collect_events()[0])
    assert MATERIAL.wrapped not in stored.state
    record = orjson.loads(stored.state)
    assert base64.b64decode(record["material"]["wrapped"]) == MATERIAL.wrapped


class KeyLifecycle(RuleBasedStateMachine):
    """Enable/disable sequences checked against a model of (state, version)."""

    def __init__(self) -> None:
        super().__init__()
        self.key = new_key()
        self.clock = T0
        self.model_state, self.model_version = ENABLED, 1
        self.history = list(self.key.collect_events())

    def _step(self, command: str, expected_type: type[Key.Event], new_state: str) -> None:
        self.clock += timedelta(seconds=1)
        n = self.model_version
        getattr(self.key, command)(call=call(command, n), timestamp=self.clock, request={})
        self.model_state, self.model_version = new_state, self.model_version + 1
        events = self.key.collect_events()
        assert [type(e) for e in events] == [expected_type]
        assert events[0].originator_version == self.model_version
        assert events[0].timestamp == self.clock
        assert_round_trips(events[0])
        self.history.extend(events)

    @rule()
    def enable(self) -> None:
        self._step("enable", Key.Enabled, ENABLED)

    @rule()
    def disable(self) -> None:
        self._step("disable", Key.Disabled, DISABLED)

    @invariant()
    def matches_the_model(self) -> None:
        assert self.key.key_state == self.model_state
        assert self.key.enabled == (self.model_state == ENABLED)
        assert self.key.version == self.model_version
        assert self.key.version_number == 1

    def teardown(self) -> None:
        replayed: Any = None
        for event in self.history:
            decoded = MAPPER.to_domain_event(MAPPER.to_stored_event(event))
            assert isinstance(decoded, Key.Event)
            replayed = decoded.mutate(replayed)
        assert isinstance(replayed, Key)
        assert (replayed.key_state, replayed.version) == (self.model_state, self.model_version)
        assert replayed.current_material == MATERIAL


KeyLifecycle.TestCase.settings = settings(max_examples=60, stateful_step_count=15, deadline=None)
test_key_lifecycle_matches_a_model_of_state_and_version = KeyLifecycle.TestCase


def test_key_and_created_event_reprs_redact_the_wrapped_material() -> None:
    from datetime import UTC, datetime
    from uuid import uuid4

    from ledger.domain.model import CallContext, Key

    call = CallContext("CreateKey", str(uuid4()), "p", "us-east-1", "111122223333")
    key = Key.create(
        key_id=uuid4(),
        arn="arn:aws:kms:us-east-1:111122223333:key/x",
        call=call,
        timestamp=datetime.now(UTC),
        description="",
        key_spec="SYMMETRIC_DEFAULT",
        key_usage="ENCRYPT_DECRYPT",
        origin="AWS_KMS",
        material=MATERIAL,
        request={},
    )
    wrapped_b64 = base64.b64encode(MATERIAL.wrapped).decode()
    assert wrapped_b64 not in repr(key)
    (created,) = key.collect_events()
    assert wrapped_b64 not in repr(created)
    assert MATERIAL.material_id in repr(created)
