"""The HEC forwarder with the real broker, the real relay and a real HTTP receiver.

The receiver is ``http.server`` on loopback speaking the HEC event protocol: it checks
``Authorization: Splunk <token>``, answers ``{"text": "Success", "code": 0}``, and can
be stopped (connections refused) or told to answer 503 ("Server is busy", code 9).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from cli.main import main as cli_main
from consumers.broker import TansuBroker
from consumers.hec import TOKEN_ENV, HecClient, HecForwarder
from consumers.relay import AuditRelay, partition_for, read_topic
from ledger.bootstrap import open_ledger
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings
from tests.fakes_relay import InMemoryLedger, InMemoryPositions, mixed_events

pytestmark = [pytest.mark.kafka]

TOKEN = secrets.token_hex(16)
PARTITIONS = 3
CALLER = Caller(principal="arn:aws:iam::111122223333:root")
FAKE_LEDGER_ID = "ledger-hec-it"


class Crash(Exception):
    pass


class Receiver:
    """A loopback HEC endpoint that records the events of every accepted POST."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.port = 0
        self.posts: list[list[dict[str, Any]]] = []  # accepted POSTs, in arrival order
        self.body_sizes: list[int] = []  # of accepted POSTs
        self.busy_answers = 0
        self.rejected_tokens = 0
        self.fail_next = 0
        self._lock = threading.Lock()
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/collector/event"

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [event for post in self.posts for event in post]

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    if self.headers.get("Authorization") != f"Splunk {receiver.token}":
                        receiver.rejected_tokens += 1
                        self._answer(403, {"text": "Invalid token", "code": 4})
                    elif receiver.fail_next > 0:
                        receiver.fail_next -= 1
                        receiver.busy_answers += 1
                        self._answer(503, {"text": "Server is busy", "code": 9})
                    elif self.path != "/services/collector/event":
                        self._answer(404, {"text": "The requested URL was not found", "code": 404})
                    else:
                        receiver.posts.append(_split_events(body))
                        receiver.body_sizes.append(len(body))
                        self._answer(200, {"text": "Success", "code": 0})

            def _answer(self, status: int, answer: dict[str, Any]) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = HTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop answering: later connections to the port are refused."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _split_events(body: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a HEC batch body (concatenated, optional whitespace between)."""
    decoder = json.JSONDecoder()
    text = body.decode("utf-8")
    events, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        event, i = decoder.raw_decode(text, i)
        events.append(event)
    return events


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(TOKEN)
    r.start()
    yield r
    r.stop()


def _names() -> tuple[str, str]:
    suffix = secrets.token_hex(4)
    return f"keyledger.audit.hec-it.{suffix}", f"hec-it-{suffix}"


def _publish_fake(bootstrap: str, topic: str, n: int) -> None:
    """``n`` realistic records through the real relay (in-memory ledger, real broker)."""
    source = InMemoryLedger()
    source.extend(mixed_events(n))
    relay = AuditRelay(
        reader=source,
        positions=InMemoryPositions(),
        bootstrap=bootstrap,
        ledger_id=FAKE_LEDGER_ID,
        topic=topic,
        checkpoint_topic=topic + ".checkpoints",
        partitions=PARTITIONS,
    )
    with relay:
        assert relay.run_once() == n


def _forwarder(bootstrap: str, url: str, topic: str, group: str, **kw: Any) -> HecForwarder:
    return HecForwarder(
        client=HecClient(url, TOKEN, timeout=5.0),
        bootstrap=bootstrap,
        topic=topic,
        group_id=group,
        batch_size=kw.pop("batch_size", 20),
        max_wait=kw.pop("max_wait", 0.2),
        backoff_initial=0.05,
        backoff_max=0.4,
        **kw,
    )


def _assert_per_partition_order(events: list[dict[str, Any]], ledger_id: str) -> None:
    """Within each partition (derived from the record's key ARN), seq only increases."""
    by_partition: dict[int, list[int]] = defaultdict(list)
    for event in events:
        resources = event["event"].get("resources") or [{"ARN": ledger_id}]
        partition = partition_for(resources[0]["ARN"].encode(), PARTITIONS)
        by_partition[partition].append(event["fields"]["seq"])
    assert len(by_partition) > 1
    for seqs in by_partition.values():
        assert seqs == sorted(seqs)


@pytest.fixture
def sqlite_ledger(tmp_path: Path, softhsm_keystore: Pkcs11KeyStore) -> Iterator[KeyLedger]:
    app = open_ledger(Settings(data_dir=tmp_path / "data"), keystore=softhsm_keystore)
    yield app
    app.close()


@pytest.mark.softhsm
def test_forwarder_delivers_every_ledger_record_once_across_a_receiver_outage(
    sqlite_ledger: KeyLedger, kafka_broker: TansuBroker, receiver: Receiver
) -> None:
    ledger = sqlite_ledger
    keys: list[str] = []
    partitions: set[int] = set()
    while len(keys) < 4 or len(partitions) < 2:  # random ARNs may share one partition
        meta = ledger.create_key(caller=CALLER)["KeyMetadata"]
        keys.append(meta["KeyId"])
        partitions.add(partition_for(meta["Arn"].encode(), PARTITIONS))
    for i in range(150):
        ledger.encrypt(caller=CALLER, key_id=keys[i % len(keys)], plaintext=b"not-for-splunk")
    ledger.disable_key(caller=CALLER, key_id=keys[0])
    with pytest.raises(Exception, match="disabled"):
        ledger.encrypt(caller=CALLER, key_id=keys[0], plaintext=b"x")
    n = ledger.db.head_seq()
    topic, group = _names()
    with AuditRelay(
        reader=ledger.db,
        positions=ledger.db,
        bootstrap=kafka_broker.bootstrap,
        ledger_id=ledger.ledger_id,
        topic=topic,
        checkpoint_topic=topic + ".checkpoints",
        partitions=PARTITIONS,
    ) as relay:
        assert relay.run_once() == n

    def take_receiver_down(batches: int) -> None:
        if batches == 2:  # runs in the forwarder's thread, after a POST succeeded
            receiver.stop()

    forwarder = _forwarder(
        kafka_broker.bootstrap, receiver.url, topic, group, after_post=take_receiver_down
    )
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            forwarder.run(once=True)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while forwarder.stats.failed_posts < 3:  # connections refused meanwhile
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    receiver.fail_next = 3  # back up, but busy for the next three POSTs
    receiver.start()
    thread.join(timeout=90)
    assert not thread.is_alive() and not outcome

    assert receiver.busy_answers == 3
    assert receiver.rejected_tokens == 0
    assert forwarder.stats.failed_posts >= 6
    events = receiver.events
    assert sorted(e["fields"]["seq"] for e in events) == list(range(1, n + 1))
    assert forwarder.stats.records == n
    _assert_per_partition_order(events, ledger.ledger_id)
    published = {
        v["seq"]: v
        for v in (orjson.loads(r.value) for r in read_topic(kafka_broker.bootstrap, topic))
    }
    for event in events:  # each HEC copy is the published record, with its proof fields
        envelope = published[event["fields"]["seq"]]
        assert event["event"] == envelope["record"]
        assert event["fields"]["recordHash"] == envelope["recordHash"]
        assert event["sourcetype"] == "aws:cloudtrail"
        assert event["source"] == f"keyledger:{ledger.ledger_id}"
    assert [e["event"]["errorCode"] for e in events if "errorCode" in e["event"]] == [
        "DisabledException"
    ]

    again = _forwarder(kafka_broker.bootstrap, receiver.url, topic, group).run(once=True)
    assert again.records == 0  # every offset was committed


def test_a_forwarder_restarted_in_the_same_group_delivers_the_rest_exactly_once(
    kafka_broker: TansuBroker, receiver: Receiver
) -> None:
    n = 240
    topic, group = _names()
    _publish_fake(kafka_broker.bootstrap, topic, n)
    stop = threading.Event()

    def stop_after_three(batches: int) -> None:
        if batches == 3:
            stop.set()  # the batch in hand is still committed before the loop exits

    first = _forwarder(
        kafka_broker.bootstrap, receiver.url, topic, group, after_post=stop_after_three
    ).run(stop=stop)
    assert first.batches == 3
    assert 0 < first.records < n
    assert len(receiver.events) == first.records

    second = _forwarder(kafka_broker.bootstrap, receiver.url, topic, group).run(once=True)
    assert first.records + second.records == n
    seqs = Counter(e["fields"]["seq"] for e in receiver.events)
    assert sorted(seqs) == list(range(1, n + 1))
    assert set(seqs.values()) == {1}
    _assert_per_partition_order(receiver.events, FAKE_LEDGER_ID)


def test_a_forwarder_killed_between_post_and_commit_resends_only_that_batch(
    kafka_broker: TansuBroker, receiver: Receiver
) -> None:
    n = 200
    topic, group = _names()
    _publish_fake(kafka_broker.bootstrap, topic, n)

    def crash_after_second(batches: int) -> None:
        if batches == 2:
            raise Crash

    with pytest.raises(Crash):
        _forwarder(
            kafka_broker.bootstrap, receiver.url, topic, group, after_post=crash_after_second
        ).run(once=True)
    assert len(receiver.posts) == 2
    resent = {e["fields"]["seq"] for e in receiver.posts[1]}

    _forwarder(kafka_broker.bootstrap, receiver.url, topic, group).run(once=True)
    seqs = Counter(e["fields"]["seq"] for e in receiver.events)
    assert sorted(seqs) == list(range(1, n + 1))
    assert {s for s, count in seqs.items() if count > 1} == resent
    assert set(seqs.values()) == {1, 2}


def test_forwarder_commits_nothing_while_the_token_is_rejected_then_batches_by_bytes(
    kafka_broker: TansuBroker, receiver: Receiver
) -> None:
    n = 30
    topic, group = _names()
    _publish_fake(kafka_broker.bootstrap, topic, n)
    receiver.token = "another-token"
    stop = threading.Event()
    forwarder = _forwarder(kafka_broker.bootstrap, receiver.url, topic, group)
    thread = threading.Thread(target=forwarder.run, kwargs={"stop": stop, "once": True})
    thread.start()
    deadline = time.monotonic() + 60
    while receiver.rejected_tokens < 3:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    stop.set()  # stopping mid-retry abandons the batch without committing it
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert forwarder.stats.records == 0

    receiver.token = TOKEN
    again = _forwarder(
        kafka_broker.bootstrap, receiver.url, topic, group, batch_bytes=6000, max_wait=5.0
    ).run(once=True)
    assert again.records == n
    assert sorted(e["fields"]["seq"] for e in receiver.events) == list(range(1, n + 1))
    assert len(receiver.posts) > 3 and max(receiver.body_sizes) <= 6000  # batches by bytes


@pytest.mark.e2e
def test_consume_hec_command_forwards_everything_once_with_the_token_from_the_environment(
    kafka_broker: TansuBroker,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    n = 50
    topic, group = _names()
    _publish_fake(kafka_broker.bootstrap, topic, n)
    monkeypatch.setenv("KEYLEDGER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KEYLEDGER_KAFKA_BOOTSTRAP", kafka_broker.bootstrap)
    argv = ["consume", "hec", "--url", receiver.url, "--topic", topic, "--group", group]

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as missing:
        cli_main([*argv, "--once"])
    assert missing.value.code == 1
    err = capsys.readouterr().err
    assert f"{TOKEN_ENV} is not set" in err and "ValidationException" in err
    assert receiver.posts == []

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(SystemExit) as done:
        cli_main([*argv, "--once", "--batch-size", "16"])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    assert f"forwarded {n} records from {topic}" in out
    assert TOKEN not in out + err
    assert sorted(e["fields"]["seq"] for e in receiver.events) == list(range(1, n + 1))
    assert max(len(post) for post in receiver.posts) <= 16
