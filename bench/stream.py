"""Audit stream figures (issue 8): relay records/s beside the raw kafka-python producer
rate to the same broker in the same run, and end-to-end latency from commit to visible
in Kafka.

Run: ``python bench/stream.py [--records 100000] [--latency-records N] [--rate 1000]
[--bootstrap HOST:PORT]``.

Throughput: a SQLite ledger in a temp dir is filled through the real recorder with
realistic Encrypt records (about 100 keys, 200 per save). The raw producer then sends
exactly the values the relay publishes (same key, value, headers and partition),
precomputed, with the relay's own producer settings (``producer_config``: idempotent,
``acks="all"``, one request in flight), and waits for every acknowledgement. The relay
(``AuditRelay.run_once``) publishes the same records from the ledger to another topic
with the same partition count; its time includes reading the ledger, building each
CloudTrail record, the per-batch confirmations and the position saves.

Latency: ``keyledger stream`` runs as its own process (polling every 50 ms) while this
process commits ``--latency-records`` records at ``--rate`` records/s (10 per save) and a
consumer thread reads the topic; latency = time a record is first returned by the
consumer minus the time its commit returned. Without ``--bootstrap`` a Tansu broker
(memory storage) is started on loopback. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.verify import make_calls, open_bench_ledger

PARTITIONS = 3
SAVE = 200


def fill(ledger: Any, n: int, start: int = 0) -> None:
    done = 0
    while done < n:
        calls = make_calls(min(SAVE, n - done), start + done)
        ledger.save(*calls)
        done += len(calls)


def create_topics(bootstrap: str, names: list[str]) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
    try:
        admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in names])
    finally:
        admin.close()


def raw_rate(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes, Any, int]]) -> float:
    """Records/s of a bare KafkaProducer with the relay's settings, acks awaited."""
    from kafka import KafkaProducer

    from consumers.relay import producer_config

    t0 = time.perf_counter()
    producer = KafkaProducer(**producer_config(bootstrap, client_id="bench-raw"))
    futures = [
        producer.send(topic, value=value, key=key, headers=headers, partition=partition)
        for key, value, headers, partition in messages
    ]
    producer.flush()
    for future in futures:
        future.get()
    elapsed = time.perf_counter() - t0
    producer.close()
    return len(messages) / elapsed


def relay_rate(ledger: Any, bootstrap: str, topic: str, n: int) -> tuple[float, int]:
    from consumers.relay import AuditRelay

    t0 = time.perf_counter()
    with AuditRelay(
        reader=ledger.db,
        positions=ledger.db,
        bootstrap=bootstrap,
        ledger_id=ledger.ledger_id,
        topic=topic,
    ) as relay:
        sent = relay.run_once()
        elapsed = time.perf_counter() - t0
    return n / elapsed, sent


def messages_of(ledger: Any, n: int) -> list[tuple[bytes, bytes, Any, int]]:
    """(key, value, headers, partition) of every record, exactly as the relay sends them."""
    from consumers.relay import message_headers, message_key, message_value, partition_for

    out = []
    position = 0
    while position < n:
        for record in ledger.db.read_records(position, 5000):
            event = record.event()
            key = message_key(event, ledger.ledger_id)
            value = message_value(record, ledger.ledger_id, event)
            out.append((key, value, message_headers(record), partition_for(key, PARTITIONS)))
            position = record.seq
    return out


def latency(
    ledger: Any, data_dir: Path, bootstrap: str, topic: str, n: int, rate: float
) -> list[float]:
    """Commit-to-visible latencies (seconds) of ``n`` records committed at ``rate``/s."""
    from kafka import KafkaConsumer, TopicPartition

    first = ledger.db.head_seq() + 1
    ledger.db.set_position(f"relay:{topic}", first - 1)  # the relay starts at the head
    committed: dict[int, float] = {}
    seen: dict[int, float] = {}
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            for messages in consumer.poll(timeout_ms=50).values():
                now = time.time()
                for m in messages:
                    seq = int(dict(m.headers)["seq"])
                    if seq >= first:
                        seen.setdefault(seq, now)
            if len(seen) >= n:
                done.set()

    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLEDGER_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    relay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "--data-dir",
            str(data_dir),
            "stream",
            "--bootstrap",
            bootstrap,
            "--topic",
            topic,
            "--poll-interval",
            "0.05",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        time.sleep(3)  # let the relay process start and create its producer
        per_save = 10
        t0 = time.perf_counter()
        for i in range(0, n, per_save):
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            calls = make_calls(min(per_save, n - i), 10_000_000 + i)
            ledger.save(*calls)
            now = time.time()
            for j in range(len(calls)):
                committed[first + i + j] = now
        done.wait(timeout=120)
    finally:
        done.set()
        relay.terminate()
        relay.wait(timeout=30)
        reader.join(timeout=10)
        consumer.close()
    return [seen[s] - committed[s] for s in committed if s in seen]


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if values else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--latency-records", type=int, default=None, help="default: records/10")
    p.add_argument("--rate", type=float, default=1000.0, help="commits/s in the latency run")
    p.add_argument("--bootstrap", default=None, help="an existing broker (default: Tansu)")
    a = p.parse_args()
    n = a.records
    n_lat = a.latency_records or max(100, n // 10)

    from consumers.broker import TansuBroker

    broker = None if a.bootstrap else TansuBroker().start()
    bootstrap = a.bootstrap or (broker.bootstrap if broker else "")
    run = os.urandom(4).hex()
    raw_topic, relay_topic, lat_topic = (f"bench.stream.{k}.{run}" for k in ("raw", "relay", "lat"))
    try:
        with tempfile.TemporaryDirectory(prefix="kl-bench-stream-") as tmp:
            data_dir = Path(tmp) / "data"
            ledger = open_bench_ledger(data_dir)
            t0 = time.perf_counter()
            fill(ledger, n)
            print(
                f"cpus: {os.cpu_count()}; broker: {'given' if a.bootstrap else 'Tansu (memory)'};"
                f" ledger: {n:,} Encrypt records in {time.perf_counter() - t0:.1f} s"
            )
            create_topics(bootstrap, [raw_topic, relay_topic, lat_topic])
            messages = messages_of(ledger, n)
            size = sum(len(m[1]) for m in messages) / n
            raw = raw_rate(bootstrap, raw_topic, messages)
            del messages
            relay, sent = relay_rate(ledger, bootstrap, relay_topic, n)
            print(
                f"throughput ({n:,} records, {size:,.0f} B values, {PARTITIONS} partitions, "
                f"idempotent, acks=all): raw kafka-python producer {raw:,.0f}/s, "
                f"relay {relay:,.0f}/s ({sent:,} sent), ratio {relay / raw:.2f} (target >= 0.8)"
            )
            lat = latency(ledger, data_dir, bootstrap, lat_topic, n_lat, a.rate)
            ledger.close()
            if lat:
                print(
                    f"latency commit -> visible in Kafka ({len(lat):,} of {n_lat:,} records at "
                    f"{a.rate:,.0f}/s, relay polling every 50 ms): "
                    f"p50 {1000 * percentile(lat, 50):.0f} ms, "
                    f"p95 {1000 * percentile(lat, 95):.0f} ms, max {1000 * max(lat):.0f} ms"
                )
            else:
                print("latency: no record became visible")
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
