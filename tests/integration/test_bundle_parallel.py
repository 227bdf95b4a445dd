"""The two-process bundle scan (a big export's second half in a forked process) reports
exactly what the one-process scan reports: clean, and under every tamper at every
position, the seam between the halves included."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import ledger.offline_verify as ov
from ledger import audit
from ledger.service import Caller, KeyLedger

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
N = 30


@pytest.fixture
def bundle(ledger: KeyLedger, tmp_path: Path) -> tuple[Path, list[ov.VerifierKey]]:
    keys = [ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"] for _ in range(3)]
    while ledger.db.head_seq() < N:
        n = ledger.db.head_seq()
        ledger.encrypt(caller=CALLER, key_id=keys[n % 3], plaintext=b"m")
        if n in (9, 20):
            audit.make_checkpoint(ledger)
    audit.make_checkpoint(ledger)
    out = tmp_path / "bundle"
    audit.write_export(ledger, out, 1, None)
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
