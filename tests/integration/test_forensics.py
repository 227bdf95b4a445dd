"""The usage index answers every forensic query exactly as a brute-force scan of the log
does, on a ledger written by the generator through the real service, on SQLite and
PostgreSQL; rebuilds are idempotent and survive being killed midway."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bench.generate import START, generate
from ledger.bootstrap import open_ledger
from ledger.clock import FixedClock
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.persistence import LedgerDatabase
from ledger.service import KeyLedger
from ledger.settings import Settings
from projections.catalog import KeyCatalog, state_at
from projections.scan import (
    scan_denied_bursts,
    scan_last_used,
    scan_stats,
    scan_trail,
)
from projections.usage import Filters, UsageIndex, epoch_us

from .conftest import PG_BASE_URL, _pg_unavailable

pytestmark = pytest.mark.softhsm
ROOT = Path(__file__).resolve().parents[2]
EVENTS = 1500


@dataclass
class Generated:
    settings: Settings
    ledger: KeyLedger
    keys: list[str]
    aliases: list[str]
    principals: list[str]
    end: Any

    @property
    def db(self) -> LedgerDatabase:
        return self.ledger.db


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def generated(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    softhsm_keystore: Pkcs11KeyStore,
) -> Iterator[Generated]:
    data_dir = tmp_path_factory.mktemp("forensics") / "data"
    settings = Settings(data_dir=data_dir)
    schema = None
    if request.param == "postgres":
        import psycopg

        schema = "kl_forensics_" + uuid.uuid4().hex[:10]
        try:
            psycopg.connect(PG_BASE_URL, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            _pg_unavailable(exc)
        settings = replace(settings, database_url=f"{PG_BASE_URL}?schema={schema}")
    clock = FixedClock(START)
    ledger = open_ledger(settings, keystore=softhsm_keystore, clock=clock)
    gen = generate(ledger, clock, events=EVENTS, keys=20, principals=10, days=5, seed=11)
    yield Generated(
        settings=settings,
        ledger=ledger,
        keys=gen.keys + gen.sign_keys,
        aliases=sorted(gen.aliases),
        principals=[p.principal for p in gen.principals] + ["arn:aws:iam::111122223333:root"],
        end=clock.now(),
    )
    ledger.close()
    if schema is not None:
        import psycopg

        with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def random_filters(g: Generated, rng: random.Random) -> Filters:
    """A random combination of filters over values that occur in the ledger."""
    fields: dict[str, Any] = {}
    r = rng.random()
    if r < 0.25:
        key = rng.choice(g.keys)
        fields.update(key_arns=[key], key_sent=rng.choice([key, key.rsplit("/", 1)[1]]))
    elif r < 0.45:
        alias = rng.choice([*g.aliases, "alias/nope"])
        fields.update(alias_arn=f"arn:aws:kms:us-east-1:111122223333:{alias}", key_sent=alias)
    if rng.random() < 0.3:
        fields["principal"] = rng.choice(g.principals)
    if rng.random() < 0.3:
        fields["operations"] = rng.sample(
            ["Encrypt", "Decrypt", "GenerateDataKey", "Sign", "CreateGrant", "UpdateAlias"],
            rng.randint(1, 2),
        )
    if rng.random() < 0.3:
        span = (g.end - START).total_seconds()
        a = START + timedelta(seconds=rng.uniform(0, span))
        b = a + timedelta(seconds=rng.uniform(0, span / 2))
        fields["since_us"] = epoch_us(a.isoformat())
        if rng.random() < 0.5:
            fields["until_us"] = epoch_us(b.isoformat())
    r = rng.random()
    if r < 0.15:
        fields["error"] = True
    elif r < 0.3:
        fields["error_code"] = rng.choice(
            ["AccessDeniedException", "NotFoundException", "DisabledException"]
        )
    if rng.random() < 0.2:
        fields["context"] = [
            rng.choice([("app", f"app-{rng.randrange(20)}"), ("tenant", f"t{rng.randrange(50)}")])
            for _ in range(rng.randint(1, 2))
        ]
    if rng.random() < 0.1:
        fields["source_ip"] = rng.choice(["10.1.0.1", "10.2.0.1", "10.0.0.1"])
    if rng.random() < 0.1:
        fields["lifecycle"] = True
    if rng.random() < 0.2:
        fields["limit"] = rng.randint(1, 30)
    return Filters(**fields)


def test_every_trail_query_returns_the_rows_a_full_scan_returns(generated: Generated) -> None:
    index = UsageIndex(generated.db)
    assert index.catch_up() > EVENTS - 10
    rng = random.Random(5)
    nonempty = 0
    for i in range(150):
        f = random_filters(generated, rng)
        got = [int(r["seq"]) for r in index.trail(f)]
        assert got == scan_trail(generated.db, f), (i, f)
        nonempty += bool(got)
    assert nonempty > 60  # the filters select real rows, not only empty sets
    # Each filter alone, on a value known to occur.
    everything = index.trail(Filters())
    assert [int(r["seq"]) for r in everything] == list(range(1, generated.db.head_seq() + 1))
    for alias in generated.aliases[:5]:
        f = Filters(alias_arn=f"arn:aws:kms:us-east-1:111122223333:{alias}", key_sent=alias)
        assert [int(r["seq"]) for r in index.trail(f)] == scan_trail(generated.db, f)
        assert index.trail(f)


def test_key_trails_read_by_branch_equal_a_full_scan(generated: Generated) -> None:
    """Key trails read each key, ReEncrypt source, alias period and KeyId as sent on
    its own and merge them; whole and last-N answers must equal the full scan's."""
    index = UsageIndex(generated.db)
    index.catch_up()
    with generated.db.transaction(commit=False) as c:
        multi = [
            r["alias_arn"]
            for r in c.execute(
                f"SELECT alias_arn FROM {index.aliases} GROUP BY alias_arn HAVING COUNT(*) > 1"
            ).fetchall()
        ]
    assert multi, "some alias named more than one key"
    mid = epoch_us((START + (generated.end - START) / 2).isoformat())
    cases = [Filters(alias_arn=a, key_sent=a.split(":", 5)[5]) for a in multi]
    cases += [Filters(key_arns=[k], key_sent=k.rsplit("/", 1)[1]) for k in generated.keys]
    cases.append(Filters(key_arns=generated.keys[:6], since_us=mid))
    cases.append(Filters(key_arns=generated.keys[:3], principal=generated.principals[0]))
    # Keys alone (their calls, then ReEncrypts from them), as investigate key asks.
    for k in generated.keys[:6]:
        cases.append(Filters(key_arns=[k]))
        cases.append(Filters(key_arns=[k], lifecycle=True))
        cases.append(Filters(key_arns=[k], error_code="AccessDeniedException"))
        cases.append(Filters(key_arns=[k], operations=["ReEncrypt"]))
    cases.append(Filters(key_arns=generated.keys[:8], operations=["ReEncrypt"]))
    checked = 0
    for f in cases:
        full = scan_trail(generated.db, f)
        assert [int(r["seq"]) for r in index.trail(f)] == full, f
        for n in (1, 3, 10, 50):
            got = [int(r["seq"]) for r in index.trail(replace(f, limit=n))]
            assert got == full[-n:], (f, n)
            checked += len(full) > n
    assert checked > 20  # the limit cut real answers
    # More rows than one statement reads back at a time
    every = Filters(key_arns=generated.keys)
    full = scan_trail(generated.db, every)
    assert len(full) > 1200
    got = index.trail(replace(every, limit=1200))
    assert [int(r["seq"]) for r in got] == full[-1200:]
    assert got == index.trail(every)[-1200:]


def test_aliases_resolve_as_they_were_at_each_call(generated: Generated) -> None:
    """A retargeted alias finds calls on its old key before, on its new key after."""
    index = UsageIndex(generated.db)
    assert index.trail(Filters(operations=["UpdateAlias"])), "the generator retargets aliases"
    moved = 0
    for alias in generated.aliases:
        arn = f"arn:aws:kms:us-east-1:111122223333:{alias}"
        rows = index.trail(Filters(alias_arn=arn))
        if len({r["key_arn"] for r in rows}) > 1:
            moved += 1
            assert [int(r["seq"]) for r in rows] == scan_trail(generated.db, Filters(alias_arn=arn))
    assert moved >= 1


@pytest.mark.parametrize("by", ["key", "principal", "operation", "error", "source_ip"])
def test_stats_equal_a_full_scan(generated: Generated, by: str) -> None:
    index = UsageIndex(generated.db)
    mid = epoch_us((START + (generated.end - START) / 2).isoformat())
    keyed = [
        Filters(key_arns=[generated.keys[0]]),
        Filters(key_arns=generated.keys[:5], since_us=mid),  # ReEncrypts between them too
        Filters(key_arns=generated.keys[1:4], operations=["ReEncrypt"]),
    ]
    for bucket in (None, "day", "hour"):
        for f in (
            Filters(),
            Filters(error=True),
            Filters(operations=["Encrypt", "Decrypt"]),
            *keyed,
        ):
            got = [
                [r["grp"], r.get("period", ""), r["n"], r["first"], r["last"]]
                for r in index.stats(f, by, bucket)
            ]
            assert got == scan_stats(generated.db, f, by, bucket), (by, bucket, f)
    top = index.stats(Filters(), by, None, top=3)
    assert len(top) <= 3 and top == index.stats(Filters(), by)[:3]


def test_last_used_of_every_key_equals_a_full_scan(generated: Generated) -> None:
    index = UsageIndex(generated.db)
    used = 0
    for arn in generated.keys:
        row = index.last_used(arn)
        expected = scan_last_used(generated.db, arn)
        assert (None if row is None else int(row["seq"])) == expected, arn
        if row is not None:
            used += 1
            assert row["error_code"] is None
    assert used >= len(generated.keys) // 2


def test_denied_bursts_equal_a_full_scan(generated: Generated) -> None:
    index = UsageIndex(generated.db)
    for window, threshold in ((300, 5), (60, 3), (3600, 2), (10**7, 1)):
        got = index.denied_bursts(Filters(), window_s=window, threshold=threshold)
        assert got == scan_denied_bursts(
            generated.db, Filters(), window_s=window, threshold=threshold
        )
    assert index.denied_bursts(Filters(), window_s=300, threshold=5), "the generator bursts"


def test_pending_deletion_check_equals_a_replay_and_scan(generated: Generated) -> None:
    """Keys pending deletion or disabled now (catalog vs replay), and their calls in
    the last N days (index vs scan)."""
    catalog = KeyCatalog(generated.db)
    now = [
        d["arn"]
        for d in catalog.key_docs()
        if not d["deleted"] and d["state"] in ("PendingDeletion", "Disabled")
    ]
    replayed = state_at(generated.db)
    assert sorted(now) == sorted(
        d["arn"]
        for d in replayed.keys.values()
        if not d["deleted"] and d["state"] in ("PendingDeletion", "Disabled")
    )
    assert now, "the generator leaves some keys pending deletion"
    since = epoch_us((generated.end - timedelta(days=2)).isoformat())
    f = Filters(key_arns=sorted(now), since_us=since)
    rows = UsageIndex(generated.db).trail(f)
    assert [int(r["seq"]) for r in rows] == scan_trail(generated.db, f)


def test_as_of_at_random_points_equals_replaying_the_log_up_to_there(
    generated: Generated,
) -> None:
    """state_at(seq=N) equals one incremental replay stopped at N, for random N, and
    state_at(time=T) equals state_at(seq) of the last record at or before T."""
    from projections.state import LedgerState

    head = generated.db.head_seq()
    points = sorted(random.Random(3).sample(range(1, head + 1), 12))
    running = LedgerState()
    times: dict[int, str] = {}
    position = 0
    for record in (r for batch in _batches(generated.db) for r in batch):
        event = record.event()
        running.apply(record.seq, event)
        times[record.seq] = event["timestamp"]
        if points and record.seq == points[0]:
            points.pop(0)
            at = state_at(generated.db, seq=record.seq)
            assert at.keys == running.keys and at.aliases == running.aliases
        position = record.seq
    assert position == head and not points
    from datetime import datetime

    n = head // 2
    at_time = state_at(generated.db, time=datetime.fromisoformat(times[n]))
    at_seq = state_at(generated.db, seq=n)
    assert at_time.keys == at_seq.keys and at_time.aliases == at_seq.aliases


def _batches(db: LedgerDatabase) -> Iterator[Any]:
    position = 0
    while True:
        records = db.read_records(position, 1000)
        if not records:
            return
        yield records
        position = records[-1].seq


def test_applying_records_twice_changes_nothing(generated: Generated) -> None:
    index = UsageIndex(generated.db)
    index.catch_up()
    before = index.snapshot()
    with generated.db.transaction(commit=True) as c:
        index._apply(c, [(r.seq, r.data) for r in generated.db.read_records(0, 400)])
    generated.db.set_position("projection:usage:v1", 0)
    index.catch_up()
    assert index.snapshot() == before
    index.rebuild()
    assert index.snapshot() == before


KILLED_REBUILD = """
import os, sys, time
from pathlib import Path
import projections.usage as usage
from projections.usage import UsageIndex
from tests.integration.test_forensics import open_without_hsm

ledger = open_without_hsm(Path(sys.argv[1]), sys.argv[2] or None)
db = ledger.db
if sys.argv[3] == "workers":  # as a rebuild of a big ledger: forked workers, batches
    usage.PARALLEL_MIN_RECORDS, usage.REBUILD_BATCH = 0, 100
    os.cpu_count = lambda: 2
def progress(done, head):
    print(done, flush=True)
    time.sleep(0.2)
UsageIndex(db, batch_size=100).rebuild(progress)
print("finished", flush=True)
"""


def open_without_hsm(data_dir: Path, url: str | None) -> KeyLedger:
    """The ledger without its HSM (the database alone), as the killed-rebuild child
    opens it; keep the ledger referenced while its database is in use."""
    from cli.context import CliContext

    return CliContext(settings=Settings(data_dir=data_dir, database_url=url)).ledger_without_hsm


def kill_a_rebuild_midway(g: Generated, mode: str = "serial") -> None:
    """Start a slow rebuild in a child process (``mode`` serial, or workers: forked
    decoders, SQLite batches or COPY) and SIGKILL it after three batches."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_REBUILD,
            str(g.settings.data_dir),
            g.settings.database_url or "",
            mode,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert child.stdout is not None
    progress = [child.stdout.readline() for _ in range(3)]
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert all(line.strip().isdigit() for line in progress), progress


@pytest.mark.parametrize("mode", ["serial", "workers"])
def test_a_rebuild_killed_midway_then_rerun_gives_the_same_tables(
    generated: Generated, mode: str
) -> None:
    index = UsageIndex(generated.db)
    index.rebuild()
    clean = index.snapshot()
    kill_a_rebuild_midway(generated, mode)
    # What the killed run left is consistent: rows up to its saved position, no more.
    position = index.position
    assert 0 < position < generated.db.head_seq()
    rows = [r for r in index.snapshot() if r[0] == "kl_usage"]
    assert [r[1] for r in rows] == list(range(1, position + 1))
    index.rebuild()
    assert index.snapshot() == clean
    # A plain catch-up after a killed rebuild completes it to the same tables, too.
    kill_a_rebuild_midway(generated, mode)
    assert 0 < index.position < generated.db.head_seq()
    UsageIndex(generated.db).catch_up()
    assert index.snapshot() == clean


def chromium() -> str:
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Debian chromium is required under CI (make test installs it)")
        pytest.skip("chromium is not installed")
    return found


def test_the_html_report_renders_its_charts_in_headless_chromium(
    generated: Generated, tmp_path: Path
) -> None:
    import re

    from PIL import Image

    from cli.report import build_report

    index = UsageIndex(generated.db)
    page = build_report(index, "all calls", Filters(), by="operation")
    report = tmp_path / "report.html"
    report.write_text(page, encoding="utf-8")
    # Self-contained: nothing to fetch (only in-page references such as url(#clip)).
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\((?!#)", page)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?!#)""", page.replace("xlink:href", "x"))
    daily = index.stats(Filters(), "operation", "day")
    days = {r["period"] for r in daily}
    assert len(days) >= 4

    browser = chromium()
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no network, should the page try
        "--window-size=1200,1000",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    # The browser built the SVG charts: one marker per day for each drawn series.
    assert dom.count("<svg") >= 2 and 'id="usage-chart"' in dom
    series = re.findall(r'<g id="series-([A-Za-z0-9_-]+)">(.*?)</g>\s*</g>', dom, re.S)
    usage = {name: body for name, body in series if not name.startswith("lifecycle-")}
    assert "Encrypt" in usage and "Decrypt" in usage
    first, last = min(days), max(days)
    from datetime import date

    n_days = (date.fromisoformat(last) - date.fromisoformat(first)).days + 1
    for name, body in usage.items():
        assert body.count("<use ") == n_days, name
    assert any(name.startswith("lifecycle-") and "<use " in body for name, body in series)

    shot = tmp_path / "report.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        w, h = rgb.size
        chart = rgb.crop((0, h // 8, w * 3 // 4, h // 2))  # where the usage chart sits
        colours = chart.getcolors(maxcolors=1 << 20) or []
    inked = sum(n for n, c in colours if c != (255, 255, 255))
    assert inked > 0.02 * chart.width * chart.height  # drawn lines, not a blank page
    # matplotlib's series colours (tab10 blue and orange) are on screen.
    assert any(abs(c[0] - 31) + abs(c[1] - 119) + abs(c[2] - 180) < 30 for _, c in colours)
    assert any(abs(c[0] - 255) + abs(c[1] - 127) + abs(c[2] - 14) < 30 for _, c in colours)


def test_a_report_says_when_its_lifecycle_is_only_the_newest_events(
    generated: Generated, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cli.report as report

    index = UsageIndex(generated.db)
    changes = index.trail(Filters(lifecycle=True))
    whole = report.build_report(index, "all calls", Filters(), by="operation")
    assert f"Lifecycle events ({len(changes)})" in whole and "the last" not in whole
    monkeypatch.setattr(report, "LIFECYCLE_LIMIT", len(changes) - 1)
    cut = report.build_report(index, "all calls", Filters(), by="operation")
    assert f"Lifecycle events (the last {len(changes) - 1})" in cut
    assert f"the last {len(changes) - 1} state changes" in cut  # the chart's title


def test_history_views_equal_a_replay_and_resume_anywhere(generated: Generated) -> None:
    from projections.views import HistoryViews, replay_history

    views = HistoryViews(generated.db, batch_size=97)
    views.rebuild()
    expected = replay_history(generated.db)
    assert views.rows() == expected
    grants, versions, principals = (
        expected["kl_grants_view"],
        expected["kl_key_versions"],
        expected["kl_principals_view"],
    )
    assert {g[7] for g in grants} >= {"active", "retired", "revoked"}
    assert any(v[1] >= 2 for v in versions)  # rotations made new versions
    assert len(principals) == 10
    # A new instance resumes from the saved position (its memory reloaded from the
    # tables), and records applied twice change nothing.
    half = generated.db.head_seq() // 2
    views.rebuild()
    generated.db.set_position("projection:history:v1", half)
    assert HistoryViews(generated.db).rows() == expected
    stopped = HistoryViews(generated.db, batch_size=50)
    stopped.rebuild()
    assert stopped.rows() == expected


def test_a_rebuild_decoded_by_a_worker_process_gives_the_same_tables(
    generated: Generated, monkeypatch: pytest.MonkeyPatch
) -> None:
    import projections.usage as usage

    index = UsageIndex(generated.db, batch_size=64)
    index.rebuild()
    serial = index.snapshot()
    monkeypatch.setattr(usage, "PARALLEL_MIN_RECORDS", 0)
    monkeypatch.setattr(usage, "REBUILD_BATCH", 64)
    monkeypatch.setattr(usage.os, "cpu_count", lambda: 2)  # workers even on one core
    seen: list[int] = []
    assert index.rebuild(lambda done, head: seen.append(done)) == generated.db.head_seq()
    assert index.snapshot() == serial
    assert seen == sorted(seen) and seen[-1] == generated.db.head_seq()  # batches in order


def test_a_query_far_behind_the_log_catches_up_with_workers_to_the_same_tables(
    generated: Generated, monkeypatch: pytest.MonkeyPatch
) -> None:
    import projections.usage as usage

    index = UsageIndex(generated.db)
    index.rebuild()
    clean = index.snapshot()
    head = generated.db.head_seq()
    forked: list[int] = []
    fork_pool = usage._fork_pool

    def spy(workers: int, spec: object) -> object:
        forked.append(workers)
        return fork_pool(workers, spec)  # type: ignore[arg-type]

    monkeypatch.setattr(usage, "_fork_pool", spy)
    monkeypatch.setattr(usage, "PARALLEL_MIN_RECORDS", head // 2)
    monkeypatch.setattr(usage, "REBUILD_BATCH", 64)
    monkeypatch.setattr(usage.os, "cpu_count", lambda: 2)
    index.trail(Filters(limit=1))  # nothing behind: no workers
    assert forked == [0]
    # An index left behind by half the log (rows and position), indexes in place
    keep = head - head // 2
    with generated.db.transaction(commit=True) as c:
        for table in (index.usage, index.context):
            c.execute(f"DELETE FROM {table} WHERE seq > ?", (keep,))
        c.execute(f"DELETE FROM {index.aliases} WHERE from_seq > ?", (keep,))
        c.execute(f"UPDATE {index.aliases} SET to_seq = NULL WHERE to_seq > ?", (keep,))
    generated.db.set_position("projection:usage:v1", keep)
    assert len(index.trail(Filters(limit=5))) == 5  # its catch-up forks two workers
    assert forked == [0, 2]
    assert index.snapshot() == clean


@pytest.mark.parametrize("workers", [0, 2])
def test_overlapping_batches_write_each_row_once_without_the_unique_index(
    generated: Generated, workers: int
) -> None:
    # As after a rebuild killed with its indexes dropped, in a process that opened the
    # index before: nothing but the last seq written keeps rows from being duplicated.
    # With workers, the batches come formatted (COPY on PostgreSQL, a SQLite batch).
    index = UsageIndex(generated.db)
    index.rebuild()
    clean = index.snapshot()
    with generated.db.transaction(commit=True) as c:
        c.execute(index._drop_index("kl_usage_pairs_key"))
        for table in (index.usage, index.context, index.aliases):
            c.execute(f"DELETE FROM {table}")
        c.execute("DELETE FROM {positions} WHERE name = ?", ("projection:usage:v1",))
    records = [(r.seq, r.data) for r in generated.db.read_records(0, 400)]
    with generated.db.transaction(commit=True) as c:
        index._apply(c, records[:200])
        index._apply(c, records[100:300])  # half already there
        index._apply(c, records)  # three quarters already there
        index._apply(c, records[:50])  # all already there
    generated.db.set_position("projection:usage:v1", 50)  # an older writer's position
    index.catch_up(workers=workers, batch_size=64)
    UsageIndex(generated.db)  # the unique index again: fails on a duplicate
    assert index.snapshot() == clean


def _assert_dropped_and_rebuilt(generated: Generated, *changes: str) -> UsageIndex:
    """Make the index, run ``changes`` (an earlier version's layout) and cut its rows
    short: opening it again must drop it and catch up to the same tables."""
    index = UsageIndex(generated.db)
    index.catch_up()
    clean = index.snapshot()
    with generated.db.transaction(commit=True) as c:
        for sql in changes:
            c.execute(sql.format(usage=index.usage, aliases=index.aliases, pairs=index.context))
        c.execute(f"DELETE FROM {index.usage} WHERE seq > 10")  # not what the log says
    reopened = UsageIndex(generated.db)
    assert reopened.position == 0
    reopened.catch_up()
    assert reopened.snapshot() == clean
    return reopened


def test_an_index_in_the_old_layout_is_dropped_and_rebuilt(generated: Generated) -> None:
    old = generated.db.table("kl_usage_ctx")
    _assert_dropped_and_rebuilt(
        generated, f"CREATE TABLE {old} (pair TEXT NOT NULL, seq BIGINT NOT NULL)"
    )
    with generated.db.transaction(commit=False) as c:
        if generated.db.is_postgres:
            there = c.execute("SELECT to_regclass(?) AS t", (old,)).fetchone()["t"]
        else:
            there = c.execute(
                "SELECT name AS t FROM sqlite_master WHERE name = ?", ("kl_usage_ctx",)
            ).fetchone()
        assert not there


def test_an_index_without_name_numbers_is_dropped_and_rebuilt(generated: Generated) -> None:
    index = UsageIndex(generated.db)
    drops = [index._drop_index(n) for n in ("kl_usage_key_cov", "kl_usage_principal_cov")]
    drops.append(index._drop_index("kl_usage_fail"))  # the indexes on the numbers first
    _assert_dropped_and_rebuilt(generated, *drops, "ALTER TABLE {usage} DROP COLUMN principal_no")


def test_context_pairs_without_numbers_are_dropped_and_rebuilt(generated: Generated) -> None:
    drop = UsageIndex(generated.db)._drop_index("kl_usage_pairs_key")
    old = ("ALTER TABLE {pairs} DROP COLUMN pair_no", "ALTER TABLE {pairs} ADD COLUMN pair TEXT")
    _assert_dropped_and_rebuilt(generated, drop, *old)


def test_names_that_share_a_number_stop_the_index_and_write_nothing(
    generated: Generated, monkeypatch: pytest.MonkeyPatch
) -> None:
    from projections import usage

    index = UsageIndex(generated.db)
    index.catch_up()
    clean = index.snapshot()
    principal = next(r[-1] for r in clean if r[0] == "kl_usage" and r[-1] is not None)

    def counts() -> list[int]:
        with generated.db.transaction(commit=False) as c:
            return [
                int(c.select_values(f"SELECT COUNT(*) FROM {t}")[0][0])
                for t in (index.usage, index.context, index.names)
            ]

    with monkeypatch.context() as m:  # within one batch
        m.setattr(usage, "name_number", lambda name: 7)
        with pytest.raises(usage.NameCollision, match="have the same number 7"):
            index.rebuild()
    assert index.position == 0 and counts() == [0, 0, 0]
    with generated.db.transaction(commit=True) as c:  # with a name stored before
        c.execute(f"INSERT INTO {index.names} (no, name) VALUES (?, 'someone else')", (principal,))
    with pytest.raises(usage.NameCollision, match="'someone else' have the same number"):
        index.catch_up()
    assert index.position == 0 and counts() == [0, 0, 1]
    with generated.db.transaction(commit=True) as c:
        c.execute(f"DELETE FROM {index.names}")
    index.rebuild()
    assert index.snapshot() == clean


@pytest.mark.parametrize("generated", ["postgres"], indirect=True)
def test_an_index_with_text_in_the_database_collation_is_dropped_and_rebuilt(
    generated: Generated,
) -> None:
    # Tables of the previous version had text in the database's collation; the index
    # keys are now compared byte by byte ("C"), so such tables are rebuilt.
    index = _assert_dropped_and_rebuilt(
        generated, 'ALTER TABLE {aliases} ALTER COLUMN key_arn TYPE TEXT COLLATE "default"'
    )
    with generated.db.transaction(commit=False) as c:
        collations = c.select_values(
            "SELECT DISTINCT l.collname FROM pg_attribute a JOIN pg_collation l "
            "ON l.oid = a.attcollation WHERE a.attrelid IN (to_regclass(?), to_regclass(?), "
            "to_regclass(?)) AND a.attnum > 0",
            (index.usage, index.context, index.aliases),
        )
    assert [r[0] for r in collations] == ["C"]
    # Alias periods join the two tables' key ARNs (an error if their collations differ)
    with generated.db.transaction(commit=False) as c:
        alias_arn = c.select_values(f"SELECT alias_arn FROM {index.aliases} LIMIT 1")[0][0]
    assert index.trail(Filters(alias_arn=alias_arn))


@pytest.mark.parametrize("generated", ["postgres"], indirect=True)
def test_a_workers_range_read_equals_the_join(generated: Generated) -> None:
    import psycopg

    from projections import usage

    db = generated.db
    spec = usage._reader_spec(db)
    assert spec is not None
    sql = [db.sql(q) for q in (usage._READ_CHAIN, usage._READ_EVENTS, usage._READ_EVENTS_BY_ID)]
    every_third = [sql[0] + " AND seq %% 3 = 0", *sql[1:]]  # ids spread out: read by id
    with psycopg.connect(**spec, autocommit=True) as conn, db.transaction(commit=False) as c:
        for lo, hi in ((0, 50), (37, 400), (390, db.head_seq()), (db.head_seq(), 10**9)):
            joined = [(int(q), bytes(b)) for q, b in c.select_values(usage._READ_RANGE, (lo, hi))]
            assert usage.read_range(conn, sql, lo, hi) == joined
            thirds = [(q, b) for q, b in joined if q % 3 == 0]
            assert usage.read_range(conn, every_third, lo, hi) == thirds
        assert len(joined) == 0 and len(usage.read_range(conn, sql, 0, 400)) == 400


@pytest.mark.parametrize("generated", ["sqlite"], indirect=True)  # SQLite's pragmas
def test_a_rebuild_leaves_the_connection_settings_as_it_found_them(generated: Generated) -> None:
    def pragmas() -> tuple[object, ...]:
        with generated.db.transaction(commit=False) as c:
            return tuple(
                dict(c.execute(f"PRAGMA {name}").fetchone() or {}).popitem()[1]
                for name in ("secure_delete", "threads")
            )

    with generated.db.transaction(commit=False) as c:
        c.execute("PRAGMA secure_delete = ON")  # as Debian builds SQLite
    before = pragmas()
    assert before == (1, 0)
    index = UsageIndex(generated.db)
    index.rebuild()
    # The rebuild clears without zeroing and sorts in threads, then puts both back
    assert pragmas() == before
