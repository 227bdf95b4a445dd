"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from consumers.broker import BrokerStartError, TansuBroker


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[TansuBroker]:
    """One in-memory Tansu broker on a free loopback port for the whole session.

    Skips when the broker cannot start, except under ``CI=true``, where that fails.
    """
    try:
        broker = TansuBroker().start()
    except BrokerStartError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Kafka test broker did not start: {exc}")
        pytest.skip(f"Kafka test broker unavailable: {exc}")
    try:
        yield broker
    finally:
        broker.stop()
