"""Usage-index rebuild rate and forensic query latency, beside a full scan of the log.

    python bench/forensics.py [--events 1000000] [--work DIR] [--backend sqlite|postgres]
        [--runs 20] [--scan-runs 1]

For each backend it uses the ledger generated in ``DIR/<backend>`` by
``bench/generate.py`` (generating it first when absent: through the real service,
which takes a while at a million events), then prints:

- rebuild events/s and the rebuilding process's peak RSS (a forked child, so the
  figure is the rebuild's own), beside the RSS of a child that only opens the ledger;
- p50/p95 latency of each canned query over ``--runs`` runs with varied arguments;
- the same questions answered by a full scan of the log (``projections.scan``),
  ``--scan-runs`` times each, and the speed-up.

Targets (issue 7): rebuild >= 50,000 events/s, every query p95 < 100 ms, memory
bounded while rebuilding.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ledger.service import KeyLedger  # noqa: E402
from projections.catalog import KeyCatalog  # noqa: E402
from projections.scan import (  # noqa: E402
    scan_denied_bursts,
    scan_last_used,
    scan_stats,
    scan_trail,
)
from projections.usage import Filters, UsageIndex  # noqa: E402

PG_BASE = os.environ.get("KEYLEDGER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
ACCOUNT_PREFIX = "arn:aws:kms:us-east-1:111122223333:"


def backend_paths(work: Path, backend: str, events: int) -> tuple[Path, str | None]:
    data_dir = work / backend / "data"
    url = f"{PG_BASE}?schema=kl_bench_forensics_{events}" if backend == "postgres" else None
    return data_dir, url


def ensure_generated(work: Path, backend: str, events: int) -> None:
    """Generate the backend's ledger unless it is there. PostgreSQL gets a record-for-
    record copy of the SQLite ledger when that exists (``bench/copy_ledger.py``: the
    same bytes, chain and head, appended through the PostgreSQL recorder)."""
    marker = work / backend / f"done-{events}"
    if marker.exists():
        return
    data_dir, url = backend_paths(work, backend, events)
    marker.parent.mkdir(parents=True, exist_ok=True)
    if backend == "postgres" and (work / "sqlite" / f"done-{events}").exists():
        src, _ = backend_paths(work, "sqlite", events)
        print(f"[postgres] copying the SQLite ledger of {events:,} events ...", flush=True)
        cmd = [sys.executable, str(ROOT / "bench" / "copy_ledger.py"), "--from-data-dir"]
        cmd += [str(src), "--to-data-dir", str(data_dir), "--to-database-url", str(url)]
        subprocess.run(cmd, check=True)
        marker.touch()
        return
    cmd = [sys.executable, str(ROOT / "bench" / "generate.py"), "--events", str(events)]
    cmd += ["--data-dir", str(data_dir)] + (["--database-url", url] if url else [])
    print(f"[{backend}] generating {events:,} events through the service ...", flush=True)
    subprocess.run(cmd, check=True)
    marker.touch()


def open_without_hsm(data_dir: Path, url: str | None) -> KeyLedger:
    from cli.context import CliContext
    from ledger.settings import Settings

    return CliContext(settings=Settings(data_dir=data_dir, database_url=url)).ledger_without_hsm


def child_rss(data_dir: Path, url: str | None, rebuild: bool) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB, events) of a forked child that rebuilds (or only opens)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        ledger = open_without_hsm(data_dir, url)
        index = UsageIndex(ledger.db)
        t0 = time.perf_counter()
        n = index.rebuild() if rebuild else ledger.db.head_seq()
        dt = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        os.write(w, f"{dt} {rss} {n}".encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 200).decode().split()
    os.waitpid(pid, 0)
    return float(out[0]), float(out[1]), int(out[2])


def percentiles(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    p95 = s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]
    return statistics.median(s), p95


@functools.cache
def _choices(
    index: UsageIndex, catalog: KeyCatalog
) -> tuple[list[dict[str, Any]], list[str], list[str], int]:
    """Keys (not deleted), principals, alias ARNs and the last call's time (us), read
    once per index: the distinct principals take a full read of the table."""
    docs = [d for d in catalog.key_docs() if not d["deleted"]]
    with index.db.transaction(commit=False) as c:
        principals = [
            r["principal"]
            for r in c.execute(f"SELECT DISTINCT principal FROM {index.usage}").fetchall()
        ]
        aliases = [
            r["alias_arn"]
            for r in c.execute(f"SELECT DISTINCT alias_arn FROM {index.aliases}").fetchall()
        ]
        last = c.execute(f"SELECT MAX(ts) AS ts FROM {index.usage}").fetchone()
    end = int(last["ts"]) if last and last["ts"] is not None else 0
    return docs, principals, aliases, end


def canned_queries(
    index: UsageIndex, catalog: KeyCatalog, rng: random.Random
) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (index query, full-scan equivalent), each with fresh random arguments."""
    docs, principals, aliases, end = _choices(index, catalog)
    keys = [d["arn"] for d in docs]
    db = index.db
    key = rng.choice(keys)
    alias = rng.choice(aliases) if aliases else None
    principal = rng.choice(principals)
    day = 86_400 * 1_000_000
    since = end - rng.randint(1, 10) * day

    trail_key = Filters(key_arns=[key], key_sent=key.rsplit("/", 1)[1], limit=50)
    trail_alias = Filters(alias_arn=alias, key_sent=alias, limit=50)
    trail_ctx = Filters(context=[("tenant", f"t{rng.randrange(50)}")], since_us=since, limit=50)
    denied = Filters(principal=principal, error_code="AccessDeniedException", limit=50)
    pending = [d["arn"] for d in docs if d["state"] in ("PendingDeletion", "Disabled")] or keys[:1]
    pending_f = Filters(key_arns=pending, since_us=end - 30 * day)
    key_f = Filters(key_arns=[key])

    def investigate_key() -> Any:
        return (
            index.trail(Filters(key_arns=[key], lifecycle=True)),
            index.trail(Filters(key_arns=[key], error_code="AccessDeniedException")),
            index.stats(key_f, "operation"),
            index.last_used(key),
        )

    def scan_investigate_key() -> Any:
        return (
            scan_trail(db, Filters(key_arns=[key], lifecycle=True)),
            scan_trail(db, Filters(key_arns=[key], error_code="AccessDeniedException")),
            scan_stats(db, key_f, "operation", None),
            scan_last_used(db, key),
        )

    return {
        "trail --key ID (last 50)": (
            lambda: index.trail(trail_key),
            lambda: scan_trail(db, trail_key),
        ),
        "trail --key alias/.. (last 50)": (
            lambda: index.trail(trail_alias),
            lambda: scan_trail(db, trail_alias),
        ),
        "trail --context k=v --since": (
            lambda: index.trail(trail_ctx),
            lambda: scan_trail(db, trail_ctx),
        ),
        "trail --principal P --error AccessDenied": (
            lambda: index.trail(denied),
            lambda: scan_trail(db, denied),
        ),
        "stats --by operation --per day (one key)": (
            lambda: index.stats(key_f, "operation", "day"),
            lambda: scan_stats(db, key_f, "operation", "day"),
        ),
        "last-used KEY": (lambda: index.last_used(key), lambda: scan_last_used(db, key)),
        "investigate key K": (investigate_key, scan_investigate_key),
        "investigate pending-deletion --days 30": (
            lambda: (index.stats(pending_f, "key"), index.trail(replace(pending_f, limit=50))),
            lambda: (scan_stats(db, pending_f, "key", None), scan_trail(db, pending_f)[-50:]),
        ),
        "investigate denied": (
            lambda: index.denied_bursts(Filters()),
            lambda: scan_denied_bursts(db, Filters()),
        ),
        "investigate principal P (stats by key)": (
            lambda: index.stats(Filters(principal=principal), "key"),
            lambda: scan_stats(db, Filters(principal=principal), "key", None),
        ),
    }


def bench_backend(args: argparse.Namespace, backend: str) -> None:
    ensure_generated(args.work, backend, args.events)
    data_dir, url = backend_paths(args.work, backend, args.events)
    ledger = open_without_hsm(data_dir, url)
    head = ledger.db.head_seq()
    print(f"\n== {backend}: {head:,} events")
    _, open_rss, _ = child_rss(data_dir, url, rebuild=False)
    best = None
    for _ in range(args.rebuilds):
        dt, rss, n = child_rss(data_dir, url, rebuild=True)
        if best is None or dt < best[0]:
            best = (dt, rss, n)
    assert best is not None
    dt, rss, n = best
    print(
        f"rebuild usage index: {n:,} events in {dt:.1f} s = {n / dt:,.0f} events/s "
        f"(target >= 50,000); peak RSS {rss:.0f} MiB (a child that only opens the "
        f"ledger: {open_rss:.0f} MiB)"
    )
    index = UsageIndex(ledger.db)
    catalog = KeyCatalog(ledger.db)
    index.catch_up()
    catalog.catch_up()
    print(f"{'query':<44} {'p50 ms':>8} {'p95 ms':>8} {'full scan ms':>13} {'speed-up':>9}")
    names = list(canned_queries(index, catalog, random.Random(0)))
    for name in names:
        samples = []
        for i in range(args.runs):
            fn = canned_queries(index, catalog, random.Random(i))[name][0]
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000)
        p50, p95 = percentiles(samples)
        scans = []
        for i in range(args.scan_runs):
            fn = canned_queries(index, catalog, random.Random(i))[name][1]
            t0 = time.perf_counter()
            fn()
            scans.append((time.perf_counter() - t0) * 1000)
        flag = "" if p95 < 100 else "  (over 100 ms)"
        if not scans:  # --scan-runs 0: the index only
            print(f"{name:<44} {p50:>8.1f} {p95:>8.1f} {'-':>13} {'-':>9}{flag}")
            continue
        scan = statistics.median(scans)
        print(f"{name:<44} {p50:>8.1f} {p95:>8.1f} {scan:>13,.0f} {scan / p50:>8,.0f}x{flag}")
    ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-forensics"))
    parser.add_argument("--backend", action="append", choices=["sqlite", "postgres"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--scan-runs", type=int, default=1)
    parser.add_argument("--rebuilds", type=int, default=2)
    args = parser.parse_args()
    for backend in args.backend or ["sqlite", "postgres"]:
        bench_backend(args, backend)


if __name__ == "__main__":
    main()
