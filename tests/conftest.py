"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.broker import BrokerStartError, TansuBroker


def pytest_configure(config: pytest.Config) -> None:
    """Let the CLI and server subprocesses the tests start cache their bytecode.

    With PYTHONDONTWRITEBYTECODE set (as on these machines) every subprocess recompiled
    the project's modules; the cache goes to a temp dir, never into the checkout.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    cache = Path(tempfile.gettempdir()) / f"keyledger-test-pycache-{os.getuid()}"
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(cache))


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
