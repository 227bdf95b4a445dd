"""Principals as of any seq or time, replayed from the log, equal what the live service
answered at that moment (ListPrincipals and DescribePrincipal), on both backends."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ledger.bootstrap import open_ledger
from ledger.clock import FixedClock
from ledger.errors import NotFoundError
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings
from projections.catalog import describe_principal_at, principals_at, state_at

pytestmark = pytest.mark.softhsm
ROOT = Caller(principal="arn:aws:iam::111122223333:root")
START = datetime(2026, 3, 1, tzinfo=UTC)
POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
    }
)


@pytest.fixture
def timed(
    ledger_settings: Settings, softhsm_keystore: Pkcs11KeyStore
) -> Iterator[tuple[KeyLedger, FixedClock]]:
    clock = FixedClock(START)
    app = open_ledger(ledger_settings, keystore=softhsm_keystore, clock=clock)
    yield app, clock
    app.close()


def live_view(led: KeyLedger, names: list[str]) -> dict[str, Any]:
    described: dict[str, Any] = {}
    for name in names:
        try:
            described[name] = led.describe_principal(name=name, account="111122223333")
        except NotFoundError:
            described[name] = None
    return {"list": led.list_principals(), "described": described}


def replayed_view(state: Any, names: list[str]) -> dict[str, Any]:
    described: dict[str, Any] = {}
    for name in names:
        try:
            described[name] = describe_principal_at(state, name, "111122223333")
        except NotFoundError:
            described[name] = None
    return {"list": principals_at(state), "described": described}


def test_principals_as_of_any_point_equal_the_live_answers_then(
    timed: tuple[KeyLedger, FixedClock],
) -> None:
    led, clock = timed
    names = ["alice", "bob", "carol"]
    steps: list[Callable[[], Any]] = [
        lambda: led.create_principal(caller=ROOT, name="alice"),
        lambda: led.attach_principal_policy(
            caller=ROOT, name="alice", policy_name="p1", policy=POLICY
        ),
        lambda: led.create_principal(caller=ROOT, name="bob", principal_type="role"),
        lambda: led.set_principal_enabled(caller=ROOT, name="alice", enabled=False),
        lambda: led.attach_principal_policy(
            caller=ROOT, name="alice", policy_name="p2", policy=POLICY
        ),
        lambda: led.detach_principal_policy(caller=ROOT, name="alice", policy_name="p1"),
        lambda: led.create_principal(caller=ROOT, name="carol"),
        lambda: led.set_principal_enabled(caller=ROOT, name="alice", enabled=True),
        lambda: led.delete_principal(caller=ROOT, name="bob"),
    ]
    seen: list[tuple[int, datetime, dict[str, Any]]] = [(0, START, live_view(led, names))]
    for step in steps:
        clock.advance(timedelta(hours=1))
        step()
        seen.append((led.db.head_seq(), clock.now(), live_view(led, names)))
    # Some answers differ from one point to the next, so equality below means something.
    assert len({json.dumps(v, sort_keys=True) for _, _, v in seen}) == len(seen)
    for seq, when, view in seen:
        assert replayed_view(state_at(led.db, seq=seq), names) == view, seq
        assert replayed_view(state_at(led.db, time=when), names) == view, when
    # Half an hour before a step: the state after the previous one.
    for (_, _, before), (_, when, _) in itertools.pairwise(seen):
        mid = state_at(led.db, time=when - timedelta(minutes=30))
        assert replayed_view(mid, names) == before
