"""The audit stream end to end: a real SQLite ledger on SoftHSM2, relay processes of the
real CLI, and a real broker that goes away for a while mid-stream.

The ledger is written by the benchmark generator (keys, principals, aliases, grants,
policies, rotations, crypto calls, failures and denials) through the real service while
one relay process per topic (CloudTrail, OCSF, ECS, HEC) follows it. Each relay is
killed with SIGKILL at random moments while it is publishing, then restarted; later the
broker is frozen (SIGSTOP) for the outage while relays and writer go on, then resumed
(SIGCONT). Every topic must then hold each seq of the ledger exactly once, contiguous
from 1, with each key's records in one partition in seq order.

Why SIGSTOP and not a stop and restart: Tansu's memory storage loses everything on
restart, and this build's only persistent engine is ``s3://`` (postgres, sqlite and
turso answer FeatureNotEnabled). On ``s3://`` (moto on loopback, ``LocalObjectStore``)
the records do survive a restart, but a stop that lands during a produce leaves the
partition's watermark ahead of the batches written, so the offsets in between can
never be fetched and every consumer stalls there: a broker defect, not the relay's.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import pytest

from bench.generate import Generator
from consumers.broker import TansuBroker
from consumers.relay import HASH_HEADER, SEQ_HEADER, VIEW_TOPICS, read_topic, topic_highest_seq
from ledger.bootstrap import open_ledger
from ledger.clock import FixedClock
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings

pytestmark = [pytest.mark.softhsm, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]

VIEWS = tuple(VIEW_TOPICS)  # cloudtrail, ocsf, ecs, hec
CALLER = Caller(principal="arn:aws:iam::111122223333:root", source_ip="10.9.9.9")


def keyledger_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("keyledger")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]


@pytest.fixture
def outage_broker() -> Iterator[TansuBroker]:
    """A broker of this test's own (the session broker is not frozen)."""
    with TansuBroker() as broker:
        yield broker


@dataclass
class RelayProcess:
    """One ``keyledger stream --view V`` process, restartable."""

    view: str
    data_dir: Path
    bootstrap: str
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    starts: int = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLEDGER_")}
        env["PYTHONPATH"] = str(ROOT)
        env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT dumps every thread's stack to the log
        return env

    def args(self, *extra: str) -> list[str]:
        return [
            *keyledger_cmd(),
            "--data-dir",
            str(self.data_dir),
            "stream",
            "--bootstrap",
            self.bootstrap,
            "--view",
            self.view,
            "--batch-size",
            "200",
            *extra,
        ]

    def start(self) -> None:
        self.starts += 1
        self.log = (self.log_dir / f"relay-{self.view}-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            self.args("--poll-interval", "0.1", "--max-backoff", "2"),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def signal(self, sig: int) -> int:
        assert self.process is not None and self.log is not None
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)  # where it hangs, for the report
            self.process.wait(timeout=30)
            self.log.close()
            self.process = None
            tail = (self.log_dir / f"relay-{self.view}-{self.starts}.log").read_bytes()[-6000:]
            raise AssertionError(
                f"relay {self.view} still running 60 s after signal {sig}:\n"
                + tail.decode(errors="replace")
            ) from None
        self.log.close()
        self.process = None
        return code

    def once(self) -> str:
        proc = subprocess.run(
            self.args("--once"), env=self.env(), capture_output=True, timeout=300, check=False
        )
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        return proc.stdout.decode()


class PacedWriter(threading.Thread):
    """Writes generator traffic up to ``total - 30`` at about ``rate`` events/s, then
    Encrypt calls on its own key until the ledger holds exactly ``total`` records."""

    def __init__(self, gen: Generator, topup_key: str, total: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.gen, self.topup_key, self.total, self.rate = gen, topup_key, total, rate
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ledger = self.gen.ledger
            started, first = time.monotonic(), ledger.db.head_seq()
            bulk = self.total - 30
            wound_down = False
            while ledger.db.head_seq() < bulk:
                done = ledger.db.head_seq() - first
                ahead = done / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
                if not wound_down and ledger.db.head_seq() > self.total * 0.9:
                    self.gen.wind_down()  # disables, deletions, denied bursts
                    wound_down = True
                self.gen._loop(min(bulk, ledger.db.head_seq() + 25))
            while ledger.db.head_seq() < self.total:
                ledger.encrypt(caller=CALLER, key_id=self.topup_key, plaintext=b"topup")
        except BaseException as exc:  # reported by the test
            self.error = exc


def _positions(ledger: KeyLedger) -> dict[str, int]:
    return {v: ledger.db.get_position(f"relay:{VIEW_TOPICS[v]}") for v in VIEWS}


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _assert_exactly_once(ledger: KeyLedger, bootstrap: str, view: str, n: int) -> None:
    topic = VIEW_TOPICS[view]
    records = read_topic(bootstrap, topic, timeout=120)
    counts = Counter(int(r.headers[SEQ_HEADER]) for r in records)
    duplicated = sorted(s for s, c in counts.items() if c > 1)
    missing = sorted(set(range(1, n + 1)) - set(counts))
    assert not duplicated, f"{topic}: {len(duplicated)} seqs twice, first {duplicated[:5]}"
    assert not missing, f"{topic}: {len(missing)} seqs missing, first {missing[:5]}"
    assert len(records) == n and max(counts) == n
    stored = {r.seq: r for r in ledger.db.read_records(0, n)}
    by_key: dict[bytes | None, list[int]] = defaultdict(list)
    partitions_of: dict[bytes | None, set[int]] = defaultdict(set)
    for r in records:  # partition by partition, offset order
        seq = int(r.headers[SEQ_HEADER])
        by_key[r.key].append(seq)
        partitions_of[r.key].add(r.partition)
        record_hash = stored[seq].record_hash.hex()
        assert r.headers[HASH_HEADER] == record_hash.encode()
        assert record_hash.encode() in r.value  # every view carries the record hash
        if view == "cloudtrail":
            value = orjson.loads(r.value)
            assert (value["seq"], value["recordHash"]) == (seq, record_hash)
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), f"{topic}: records of {key!r} out of seq order"
        assert len(partitions_of[key]) == 1, f"{topic}: {key!r} in several partitions"


def run_acceptance(
    *,
    keystore: Pkcs11KeyStore,
    broker: TansuBroker,
    tmp_path: Path,
    events: int,
    kills: int,
    outage: float,
) -> None:
    data_dir = tmp_path / "data"
    clock = FixedClock(datetime(2026, 10, 1, tzinfo=UTC))
    ledger = open_ledger(Settings(data_dir=data_dir), keystore=keystore, clock=clock)
    relays = [RelayProcess(v, data_dir, broker.bootstrap, tmp_path) for v in VIEWS]
    writer: PacedWriter | None = None
    try:
        topup_key = ledger.create_key(caller=CALLER, description="top-up")["KeyMetadata"]["Arn"]
        gen = Generator(ledger, clock, seed=11, events=events, days=3)
        gen.setup(20, 10)
        gen._loop(events // 5)  # a backlog before any relay runs
        # The rest is written while relays are killed and while the broker is down.
        rate = (events - ledger.db.head_seq()) / (kills * 2.5 + outage + 5)
        writer = PacedWriter(gen, topup_key, events, rate)
        writer.start()
        for relay in relays:
            relay.start()

        rng = random.Random(events)
        unsaved_at_kill = 0  # kills that left published records beyond the saved position
        for _ in range(kills):
            at_start = _positions(ledger)
            _wait(
                lambda at_start=at_start: all(
                    p > at_start[v] for v, p in _positions(ledger).items()
                ),
                120,
                "every relay to publish after its (re)start",
            )
            for relay in rng.sample(relays, len(relays)):
                time.sleep(rng.uniform(0.0, 0.4))  # a random point while it publishes
                assert relay.signal(signal.SIGKILL) == -signal.SIGKILL
                on_topic = topic_highest_seq(broker.bootstrap, VIEW_TOPICS[relay.view])
                unsaved_at_kill += on_topic > _positions(ledger)[relay.view]
                relay.start()

        _wait(
            lambda: all(p > events // 5 for p in _positions(ledger).values()),
            120,
            "relays to resume after the kills",
        )
        assert ledger.db.head_seq() < events, "the writer finished before the outage"
        before_outage = ledger.db.head_seq()
        behind = {v: before_outage - p for v, p in _positions(ledger).items()}
        broker.pause()
        try:
            time.sleep(outage)
        finally:
            broker.resume()
        assert ledger.db.head_seq() > before_outage, "nothing was written during the outage"
        for relay in relays:  # the relays rode out the outage without a restart
            assert relay.process is not None and relay.process.poll() is None

        writer.join(timeout=600)
        assert writer.error is None, repr(writer.error)
        assert ledger.db.head_seq() == events
        _wait(lambda: set(_positions(ledger).values()) == {events}, 300, "relays to catch up")
        for relay in relays:
            assert relay.signal(signal.SIGTERM) == 0  # graceful stop
        for relay in relays:  # one more run to the end finds nothing left to publish
            assert relay.once().strip() == f"published 0 records to {VIEW_TOPICS[relay.view]}"
            assert topic_highest_seq(broker.bootstrap, VIEW_TOPICS[relay.view]) == events

        for view in VIEWS:
            _assert_exactly_once(ledger, broker.bootstrap, view, events)
        print(
            f"{events} events, {len(VIEWS)} topics; {kills} kills per relay, "
            f"{unsaved_at_kill} of {kills * len(VIEWS)} left published records beyond the "
            f"saved position; outage {outage:.0f} s at head {before_outage} "
            f"(relays behind by {behind}), "
            f"{ledger.db.head_seq() - before_outage} written after it began"
        )
    finally:
        for relay in relays:
            if relay.process is not None:
                relay.signal(signal.SIGKILL)
        if writer is not None:
            writer.join(timeout=600)
        ledger.close()


def test_a_small_stream_survives_relay_kills_and_a_broker_outage_exactly_once(
    softhsm_keystore: Pkcs11KeyStore, outage_broker: TansuBroker, tmp_path: Path
) -> None:
    run_acceptance(
        keystore=softhsm_keystore,
        broker=outage_broker,
        tmp_path=tmp_path,
        events=600,
        kills=2,
        outage=3.0,
    )


def test_ten_thousand_events_reach_every_topic_once_across_five_kills_and_a_30s_outage(
    softhsm_keystore: Pkcs11KeyStore, outage_broker: TansuBroker, tmp_path: Path
) -> None:
    run_acceptance(
        keystore=softhsm_keystore,
        broker=outage_broker,
        tmp_path=tmp_path,
        events=10_000,
        kills=5,
        outage=30.0,
    )
