"""``keyledger stream`` as a user runs it: views to their own topics, and ``stream status``."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import pytest

from consumers.broker import TansuBroker
from consumers.relay import SEQ_HEADER, read_topic
from tests.e2e.test_cli import Cli

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm, pytest.mark.kafka]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "data")


def _status(cli: Cli, *args: str) -> dict[str, object]:
    out = cli("--json", "stream", "status", *args).stdout
    status: dict[str, object] = json.loads(out)
    return status


def test_stream_status_shows_the_lag_then_a_view_relay_catches_up_on_its_own_topic(
    cli: Cli, kafka_broker: TansuBroker
) -> None:
    key = cli("keys", "create").stdout.decode().strip()
    cli("encrypt", "--key", key, stdin=b"streamed")
    n = cli.head_count()
    topic = f"keyledger.audit.hec.e2e-{uuid.uuid4().hex[:8]}"
    args = ("--bootstrap", kafka_broker.bootstrap, "--view", "hec", "--topic", topic)

    before = _status(cli, *args)
    assert before["headSeq"] == n and before["position"] == 0 and before["lagEvents"] == n
    assert isinstance(before["lagSeconds"], float) and before["lagSeconds"] >= 0
    assert before["topicSeq"] == 0 and before["broker"] == "reachable"

    out = cli("stream", *args, "--partitions", "2", "--once").stdout.decode()
    assert out.strip() == f"published {n} records to {topic}"
    published = read_topic(kafka_broker.bootstrap, topic)
    assert sorted(int(r.headers[SEQ_HEADER]) for r in published) == list(range(1, n + 1))
    assert {r.partition for r in published} <= {0, 1}
    assert all(json.loads(r.value)["sourcetype"] == "aws:cloudtrail" for r in published)

    text = cli("stream", "status", *args).stdout.decode()
    assert f"ledger head seq: {n}\n" in text
    assert f"relay position: {n}\n" in text
    assert "lag: 0 events, 0.0 s\n" in text
    assert f"highest seq on topic: {n}\n" in text
    # The CloudTrail relay has its own position, untouched by the HEC relay.
    assert _status(cli)["position"] == 0


def test_stream_status_says_when_the_broker_is_unreachable_and_exits_0(cli: Cli) -> None:
    cli("keys", "create")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    proc = cli("stream", "status", "--bootstrap", closed, "--timeout", "1")
    text = proc.stdout.decode()
    assert "topic: keyledger.audit.v1 (view cloudtrail)\n" in text
    assert "lag: 1 events" in text
    assert "highest seq on topic: unknown (broker unreachable:" in text


def test_stream_rejects_an_unknown_view(cli: Cli) -> None:
    proc = cli("stream", "--bootstrap", "127.0.0.1:1", "--view", "syslog", "--once", expect=1)
    assert b"--view must be one of cloudtrail, ocsf, ecs, hec" in proc.stderr
