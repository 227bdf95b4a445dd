"""The parallel bundle scans (a big export's second half in a forked process; or pieces
starting at the manifest's seek hints, in a pool of processes) report exactly what the
one-process scan reports: clean, and under every tamper at every position, the seams
included, and whatever the hints say."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import ledger.bundle as ledger_bundle
import ledger.offline_verify as ov
from ledger import audit
from ledger.service import Caller, KeyLedger

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
N = 30


@pytest.fixture(params=["halves", "pieces"])
def bundle(
    request: pytest.FixtureRequest,
    ledger: KeyLedger,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Path, list[ov.VerifierKey]]:
    """A bundle of N records; "pieces": with a seek hint every 4 records (else none,
    so the parallel scan counts its way to the middle)."""
    return make_bundle(ledger, tmp_path, monkeypatch, request.param == "pieces")


@pytest.fixture
def hinted(
    ledger: KeyLedger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, list[ov.VerifierKey]]:
    return make_bundle(ledger, tmp_path, monkeypatch, True)


def make_bundle(
    ledger: KeyLedger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hints: bool
) -> tuple[Path, list[ov.VerifierKey]]:
    monkeypatch.setattr(ledger_bundle, "SEEK_EVERY", 4 if hints else 1 << 16)
    keys = [ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"] for _ in range(3)]
    while ledger.db.head_seq() < N:
        n = ledger.db.head_seq()
        ledger.encrypt(caller=CALLER, key_id=keys[n % 3], plaintext=b"m")
        if n in (9, 20):
            audit.make_checkpoint(ledger)
    audit.make_checkpoint(ledger)
    out = tmp_path / "bundle"
    audit.write_export(ledger, out, 1, None)
    seek = json.loads((out / "manifest.json").read_bytes())["seek"]
    assert len(seek) == (7 if hints else 0)
    vkeys = ov.parse_verifier_keys("".join(k.vkey + "\n" for k in audit.signing_keys(ledger.db)))
    return out, vkeys


def both(
    directory: Path, keys: list[ov.VerifierKey], monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[str]]:
    def run(min_bytes: int) -> list[str]:
        monkeypatch.setattr(ov, "_PARALLEL_MIN_BYTES", min_bytes)
        report = ov.verify_bundle(directory, keys)
        return [*report.problems, report.summary()]

    return run(1 << 60), run(1)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def flip_record(d: Path, i: int) -> None:
    lines = lines_of(d / "records.jsonl")
    lines[i] = lines[i].replace(b'"m', b'"M', 1) if b'"m' in lines[i] else lines[i] + b" "
    write_lines(d / "records.jsonl", lines)


def swap_records(d: Path, i: int) -> None:
    lines = lines_of(d / "records.jsonl")
    if i + 1 < len(lines):
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    write_lines(d / "records.jsonl", lines)


def drop_record(d: Path, i: int) -> None:
    for name in ("records.jsonl", "chain.tsv"):
        lines = lines_of(d / name)
        del lines[i]
        write_lines(d / name, lines)


def break_key_prev(d: Path, i: int) -> None:
    rows = lines_of(d / "chain.tsv")
    f = rows[i].split(b"\t")
    if f[5] != b"-":
        f[5] = b"f" * 64
    rows[i] = b"\t".join(f)
    write_lines(d / "chain.tsv", rows)


def break_prev(d: Path, i: int) -> None:
    rows = lines_of(d / "chain.tsv")
    f = rows[i].split(b"\t")
    f[2] = b"e" * 64
    rows[i] = b"\t".join(f)
    write_lines(d / "chain.tsv", rows)


TAMPERS: list[Callable[[Path, int], None]] = [
    flip_record,
    swap_records,
    drop_record,
    break_key_prev,
    break_prev,
]


def halves(directory: Path) -> ov._Scan | None:
    split = ov._split_point(directory / "records.jsonl", 1)
    assert split is not None
    return ov._scan_halves(directory, split, ov._ZERO_HEX, set(range(N + 1)), set())


def test_a_clean_bundle_verifies_the_same_in_two_processes(
    bundle: tuple[Path, list[ov.VerifierKey]], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, keys = bundle
    one, two = both(directory, keys, monkeypatch)
    assert one == two == [f"{N} records valid, 3 checkpoints valid"]
    # The halves joined give the tree root at every size, as one pass does.
    scan = halves(directory)
    single = ov._scan_part(directory, 0, None, 0, 1, ov._ZERO_HEX, True, set(range(N + 1)), set())
    assert scan is not None and scan.last == single.last == N
    assert scan.roots == single.roots and len(scan.roots) == N + 1
    assert scan.blocks.blocks == single.tree.blocks


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__ for t in TAMPERS])
def test_every_tamper_at_every_position_reports_the_same_in_two_processes(
    bundle: tuple[Path, list[ov.VerifierKey]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tamper: Callable[[Path, int], None],
) -> None:
    directory, keys = bundle
    for i in range(N):
        copy = tmp_path / f"copy-{i}"
        shutil.copytree(directory, copy)
        tamper(copy, i)
        if (tamper is break_key_prev and b"\t-\n" in lines_of(copy / "chain.tsv")[i] + b"\n") or (
            tamper is swap_records and i == N - 1
        ):
            continue  # nothing was changed
        if not (tamper is drop_record and i == N - 1):  # a clean truncation: the
            assert halves(copy) is None, (tamper.__name__, i)  # checkpoint shows it
        one, two = both(copy, keys, monkeypatch)
        assert one[-1] != f"{N} records valid, 3 checkpoints valid", (i, one)
        assert one == two, (tamper.__name__, i)


def set_seek(directory: Path, seek: object) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["seek"] = seek
    path.write_text(json.dumps(manifest))


def test_the_pieces_start_at_the_hints_and_join_to_the_one_process_scan(
    hinted: tuple[Path, list[ov.VerifierKey]], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = hinted
    seek = json.loads((directory / "manifest.json").read_bytes())["seek"]
    size = (directory / "records.jsonl").stat().st_size
    monkeypatch.setattr(ov, "_PARALLEL_MIN_BYTES", 1)
    cuts = ov._seek_cuts(seek, size, 6)
    assert len(cuts) == 5 and cuts == sorted(cuts)
    rec, tsv = (directory / "records.jsonl").read_bytes(), (directory / "chain.tsv").read_bytes()
    for seq, r, t in cuts:  # each hint is where record seq's line and row start
        assert rec[:r].count(b"\n") == seq - 1 and tsv[:t].count(b"\n") == seq - 1
    sizes = set(range(N + 1))
    scan = ov._scan_pieces(directory, cuts, ov._ZERO_HEX, sizes, set(range(1, N + 1)), 2)
    single = ov._scan_part(
        directory, 0, None, 0, 1, ov._ZERO_HEX, True, sizes, set(range(1, N + 1))
    )
    assert scan is not None and scan.last == single.last == N
    assert scan.roots == single.roots and len(scan.roots) == N + 1
    assert scan.blocks.blocks == single.tree.blocks and scan.seen == single.seen


def shift(e: list[int], i: int, by: int) -> list[int]:
    return [v + by if j == i else v for j, v in enumerate(e)]


WRONG_HINTS: list[Callable[[list[list[int]]], object]] = [
    lambda s: [shift(e, 0, 1) for e in s],  # seq off by one
    lambda s: [shift(e, 1, 1) for e in s],  # mid-line in records.jsonl
    lambda s: [shift(e, 1, -5) for e in s],
    lambda s: [shift(e, 2, 1) for e in s],  # mid-row in chain.tsv
    lambda s: [shift(e, 2, -1) for e in s],
    lambda s: [s[1], s[0], *s[2:]],  # out of order
    lambda s: [[e[0], e[1], s[-1][2]] for e in s],  # every piece on one row
    lambda s: [*s, [10**9, 10**12, 10**12]],  # beyond the end
    lambda s: "garbage",
    lambda s: [["1", "2", "3"]],
]


@pytest.mark.parametrize("wrong", WRONG_HINTS)
def test_wrong_seek_hints_change_nothing_but_speed(
    hinted: tuple[Path, list[ov.VerifierKey]],
    monkeypatch: pytest.MonkeyPatch,
    wrong: Callable[[list[list[int]]], object],
) -> None:
    directory, keys = hinted
    seek = json.loads((directory / "manifest.json").read_bytes())["seek"]
    set_seek(directory, wrong(seek))
    one, two = both(directory, keys, monkeypatch)
    assert one == two == [f"{N} records valid, 3 checkpoints valid"]
    # And with a tampered record under the same wrong hints: the same report.
    flip_record(directory, N // 2)
    one, two = both(directory, keys, monkeypatch)
    assert one[-1] != f"{N} records valid, 3 checkpoints valid"
    assert one == two
