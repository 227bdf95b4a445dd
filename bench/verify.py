"""Tamper-evidence figures (issue 6): append throughput with and without the Merkle
tree, live verify and offline bundle verify of a large log, each beside raw
``hashlib.sha256`` over the same record bytes measured in the same run.

Run: ``python bench/verify.py [--events 1000000] [--append-events 100000]``.

The ledger is SQLite in a temp dir (WAL, synchronous=FULL as in production), filled
through the real recorder with realistic Encrypt records (about 100 keys, 50
principals, 800-byte records), 200 per save. No HSM is needed: checkpoints here are
signed with a throwaway Ed25519 key in memory (the HSM signs one note per checkpoint;
its cost does not grow with the log). Bundle verify runs in a subprocess per size so
its peak RSS is its own. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

BATCH = 200


class MemorySigner:
    """Stands in for the HSM's ledger signing key (same interface as the keystore)."""

    def __init__(self) -> None:
        self._keys: dict[str, Ed25519PrivateKey] = {}

    def generate_ledger_signing_key(self, label: str) -> bytes:
        self._keys[label] = Ed25519PrivateKey.generate()
        return self._keys[label].public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def ledger_sign(self, label: str, message: bytes) -> bytes:
        return self._keys[label].sign(message)

    def destroy_ledger_signing_key(self, label: str) -> None:
        self._keys.pop(label, None)

    def close(self) -> None:
        pass


def open_bench_ledger(data_dir: Path) -> Any:
    from ledger.bootstrap import ledger_env
    from ledger.service import KeyLedger
    from ledger.settings import Settings

    settings = Settings(data_dir=data_dir)
    return KeyLedger(settings=settings, keystore=MemorySigner(), env=ledger_env(settings))


def make_calls(n: int, start: int) -> list[Any]:
    from ledger.domain.model import ApiCall, CallContext

    now = datetime(2026, 11, 1, tzinfo=UTC)
    out = []
    for i in range(start, start + n):
        key = f"arn:aws:kms:us-east-1:111122223333:key/{uuid.UUID(int=i % 100)}"
        call = CallContext(
            operation="Encrypt" if i % 3 else "Decrypt",
            request_id=str(uuid.uuid4()),
            principal=f"arn:aws:iam::111122223333:user/app-{i % 50}",
            region="us-east-1",
            account_id="111122223333",
            source_ip=f"10.0.{i % 7}.{i % 250}",
            user_agent="aws-sdk-python/1.35 Python/3.11 Linux botocore/1.35",
            access_key_id="AKLD" + "X" * 16,
        )
        out.append(
            ApiCall.succeeded(
                call=call,
                timestamp=now,
                key_arn=key,
                request={
                    "keyId": key,
                    "encryptionAlgorithm": "SYMMETRIC_DEFAULT",
                    "encryptionContext": {"team": f"t{i % 9}", "purpose": "bench"},
                },
                additional={"keyMaterialId": hashlib.sha256(key.encode()).hexdigest()},
            )
        )
    return out


def append(ledger: Any, n: int, *, tree: bool) -> float:
    """Append ``n`` records 200 per save; returns records/s (event building excluded)."""
    ledger.recorder.indexer.tree_enabled = tree
    spent, done = 0.0, 0
    while done < n:
        calls = make_calls(min(BATCH, n - done), done)
        t0 = time.perf_counter()
        ledger.save(*calls)
        spent += time.perf_counter() - t0
        done += len(calls)
    return n / spent


def raw_hash_rate(records: Path) -> float:
    t0 = time.perf_counter()
    n = 0
    with records.open("rb") as f:
        for line in f:
            hashlib.sha256(line[:-1]).digest()
            n += 1
    return n / (time.perf_counter() - t0)


def rss_mib() -> float:
    """Peak RSS of this process or of its largest child (the forked second half)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def child_verify(bundle: str, vkey: str, processes: str) -> None:
    import ledger.offline_verify as ov

    if processes == "1":
        ov._PARALLEL_MIN_BYTES = 1 << 62
    keys = ov.parse_verifier_keys(Path(vkey).read_text())
    t0 = time.perf_counter()
    report = ov.verify_bundle(Path(bundle), keys)
    dt = time.perf_counter() - t0
    print(f"{report.records_valid} {dt} {rss_mib()} {int(report.ok)}")


def run_child(bundle: Path, vkey: Path, processes: str) -> tuple[int, float, float, bool]:
    out = subprocess.run(
        [sys.executable, __file__, "--child-verify", str(bundle), str(vkey), processes],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), float(out[1]), float(out[2]), out[3] == "1"


def warm(*paths: Path) -> None:
    """Read the files once so every measurement starts from the page cache."""
    for path in paths:
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--append-events", type=int, default=100_000)
    p.add_argument("--child-verify", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_verify:
        child_verify(*a.child_verify)
        return
    from ledger import audit

    print(f"cpus: {os.cpu_count()}, SQLite WAL synchronous=FULL, {BATCH} records per save")
    with tempfile.TemporaryDirectory(prefix="kl-bench-verify-") as tmp:
        root = Path(tmp)
        # Append with and without the tree, alternating, on fresh ledgers.
        rates: dict[bool, list[float]] = {True: [], False: []}
        for round_ in range(2):
            for tree in (False, True):
                led = open_bench_ledger(root / f"append-{round_}-{tree}")
                rates[tree].append(append(led, a.append_events, tree=tree))
                led.close()
        without, with_ = max(rates[False]), max(rates[True])
        print(
            f"append ({a.append_events} records, best of 2): without tree {without:,.0f}/s, "
            f"with tree {with_:,.0f}/s, ratio {with_ / without:.3f} "
            f"(tree cost {100 * (1 - with_ / without):.1f}%; target < 10%)"
        )
        # The big ledger, with checkpoints along the way.
        led = open_bench_ledger(root / "big")
        t0 = time.perf_counter()
        done = 0
        checkpoint_every = max(a.events // 4, 1)
        while done < a.events:
            n = min(checkpoint_every, a.events - done)
            append(led, n, tree=True)
            done += n
            audit.make_checkpoint(led)
        print(f"built {a.events:,} records in {time.perf_counter() - t0:.0f} s, 4 checkpoints")
        from typer.testing import CliRunner

        from cli.main import app

        runner = CliRunner()
        t0 = time.perf_counter()
        res = runner.invoke(app, ["--data-dir", str(root / "big"), "audit", "verify"])
        live = a.events / (time.perf_counter() - t0)
        print(f"live verify: {live:,.0f} records/s ({res.output.strip()[:60]}...)")
        bundle = root / "bundle"
        t0 = time.perf_counter()
        audit.write_export(led, bundle, 1, None)
        print(f"export: {a.events / (time.perf_counter() - t0):,.0f} records/s")
        vkey = root / "ledger.vkey"
        vkey.write_text("".join(k.vkey + "\n" for k in audit.signing_keys(led.db)))
        led.close()
        # Interleaved, best of 3 each: the machine is shared and noisy.
        raws, two, one = [], [], []
        for _ in range(3):
            warm(bundle / "records.jsonl", bundle / "chain.tsv")
            raws.append(raw_hash_rate(bundle / "records.jsonl"))
            n, dt, rss, ok = run_child(bundle, vkey, "2")
            two.append(n / dt)
            n1, dt1, rss1, ok1 = run_child(bundle, vkey, "1")
            one.append(n1 / dt1)
        raw = max(raws)
        print(
            f"raw sha256, 1 process, over the same bytes: {raw:,.0f} records/s "
            f"(runs: {', '.join(f'{r:,.0f}' for r in raws)})"
        )
        print(
            f"bundle verify, 2 processes: {max(two):,.0f} records/s, ratio {max(two) / raw:.2f} "
            f"(targets: >= 300,000/s and >= 0.5), peak RSS {rss:.0f} MiB, "
            f"{'clean' if ok else 'PROBLEMS'}"
        )
        print(
            f"bundle verify, 1 process:  {max(one):,.0f} records/s, ratio {max(one) / raw:.2f}, "
            f"peak RSS {rss1:.0f} MiB, {'clean' if ok1 else 'PROBLEMS'}"
        )
        print(f"live verify ratio to raw sha256: {live / raw:.2f}")
        # Memory flat: a bundle of a quarter of the records, same child.
        small = root / "bundle-quarter"
        led = open_bench_ledger(root / "big")
        cps = audit.checkpoints(led.db)
        audit.write_export(led, small, 1, cps[0].size)
        led.close()
        qn, _, qrss, _ = run_child(small, vkey, "2")
        print(
            f"peak RSS of bundle verify (2 processes): {qrss:.0f} MiB at {qn:,} records, "
            f"{rss:.0f} MiB at {n:,} records"
        )


if __name__ == "__main__":
    main()
