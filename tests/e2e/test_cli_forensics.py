"""The forensic CLI end to end: trail filters (aliases resolved as they were), CSV and
CloudTrail JSON output, stats, last-used, the canned investigations, rebuild, and one
clear error line for bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.e2e.test_cli import Cli

pytestmark = pytest.mark.softhsm


def test_forensic_commands_answer_from_the_usage_index(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "data")
    first = cli("keys", "create").stdout.decode().strip()
    second = cli("keys", "create").stdout.decode().strip()
    cli("aliases", "create", "alias/pay", "--key", first)
    plain = tmp_path / "p"
    plain.write_bytes(b"hello")
    blob = tmp_path / "blob"
    enc = ["encrypt", "--key", "alias/pay", "--context", "app=e2e", "--in", str(plain)]
    cli(*enc, "--out", str(blob))
    cli("decrypt", "--context", "app=e2e", "--in", str(blob))
    cli("aliases", "update", "alias/pay", "--key", second)
    cli(*enc)  # now on the second key
    cli("keys", "disable", first)
    cli("encrypt", "--key", first, "--in", str(plain), expect=1)  # DisabledException

    # --key alias/pay: the calls made through the alias, each on the key it named then.
    rows = list(csv.DictReader(cli("audit", "trail", "--key", "alias/pay", "--csv").stdout
                               .decode().splitlines()))  # fmt: skip
    ops = [(r["operation"], r["key_arn"]) for r in rows]
    assert ("Encrypt", first) in ops and ("Encrypt", second) in ops
    assert ("Decrypt", first) in ops  # the decrypt named no alias, but used the key then
    assert all(r["key_arn"] in (first, second) for r in rows)
    assert {r["context"] for r in rows if r["operation"] == "Encrypt"} == {'{"app":"e2e"}'}

    failed = cli("audit", "trail", "--error", "DisabledException").stdout.decode()
    assert failed.count("DisabledException") == 1 and first in failed
    ctx = cli("audit", "trail", "--context", "app=e2e", "--operation", "Decrypt").stdout
    assert ctx.decode().count("Decrypt") == 1

    # --json: CloudTrail records in their envelope, one per line.
    lines = cli("--json", "audit", "trail", "--key", first).stdout.decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["record"]["eventName"] for r in records][-2:] == ["DisableKey", "Encrypt"]
    assert all(r["record"]["eventSource"] == "kms.amazonaws.com" for r in records)

    # last-used: the Decrypt on the first key (the later Encrypt failed).
    used = json.loads(cli("--json", "audit", "last-used", first).stdout)["KeyLastUsage"]
    assert used["Operation"] == "Decrypt"
    decrypt = next(r for r in records if r["record"]["eventName"] == "Decrypt")
    assert used["CloudTrailEventId"] == decrypt["record"]["eventID"]
    assert "last Decrypt at" in cli("audit", "last-used", first).stdout.decode()

    stats = cli("audit", "stats", "--by", "operation").stdout.decode().splitlines()
    assert stats[0].split()[:2] == ["3", "Encrypt"]  # two succeeded, one failed
    timeline = cli("audit", "investigate", "key", first).stdout.decode()
    assert "== lifecycle (3 events)" in timeline and "DisableKey" in timeline
    pending = cli("audit", "investigate", "pending-deletion", "--days", "1").stdout.decode()
    assert first in pending and second not in pending
    assert "no AccessDenied bursts" in cli("audit", "investigate", "denied").stdout.decode()
    who = cli("audit", "investigate", "principal", "arn:aws:iam::111122223333:root").stdout
    assert b"== byKey (" in who
    rebuilt = cli("projections", "rebuild", "--name", "usage").stdout.decode()
    assert rebuilt.startswith("rebuilt usage index from 9 events") and "events/s" in rebuilt

    page = tmp_path / "report.html"
    assert cli("audit", "report", "--key", "alias/pay", "--out", str(page)).stdout.startswith(
        f"wrote {page}".encode()
    )
    html = page.read_text()
    assert html.count("<svg") == 2 and "KeyLedger report: key alias/pay" in html

    before = cli.head_count()
    for args, message in [
        (("audit", "report", "--out", str(page)), "exactly one of --key"),
        (("audit", "trail", "--key", "nonsense"), "--key must be"),
        (("audit", "trail", "--since", "yesterday"), "--since must be an RFC 3339 time"),
        (("audit", "trail", "--context", "novalue"), "--context must be k=v"),
        (("audit", "stats", "--by", "colour"), "--by must be"),
        (("audit", "last-used", "alias/pay"), "Alias names are not supported"),
        (("projections", "rebuild", "--name", "nope"), "--name must be"),
    ]:
        proc = cli(*args, expect=1)
        err = proc.stderr.decode().strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ValidationException"), err
        assert message in err[0], err
    assert cli.head_count() == before
