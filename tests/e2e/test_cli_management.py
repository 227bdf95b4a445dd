"""Management commands of the `keyledger` CLI as a user runs them: real processes,
SoftHSM2, SQLite, a fresh data dir per test."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm]

ROOT = Path(__file__).resolve().parents[2]
ME = "arn:aws:iam::111122223333"
POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Enable IAM policies",
                "Effect": "Allow",
                "Principal": {"AWS": f"{ME}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
)


def keyledger_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("keyledger")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("keyledger")
    return [found] if found else [sys.executable, "-m", "cli.main"]


class Cli:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("KEYLEDGER_", "SOFTHSM2"))
        }
        self.env["PYTHONPATH"] = str(ROOT)

    def run(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*keyledger_cmd(), "--data-dir", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        return proc

    def lines(self, *args: str) -> list[str]:
        return self.run(*args).stdout.splitlines()

    def json(self, *args: str) -> Any:
        return json.loads(self.run("--json", *args).stdout)

    def fails(self, *args: str) -> str:
        """The one error line of a command that must exit 1 and print nothing."""
        proc = self.run(*args, expect=1)
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    def head(self) -> int:
        out = self.run("audit", "verify").stdout
        assert out.startswith("OK: ")
        return int(out.split()[1])


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "data")


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_management_scenario_end_to_end(cli: Cli, tmp_path: Path) -> None:
    # keys: create with tags, update the description
    md = cli.json("keys", "create", "--description", "v1", "--tag", "team=blue", "--tag", "env=")[
        "KeyMetadata"
    ]
    key, arn = md["KeyId"], md["Arn"]
    assert cli.lines("keys", "tags", key) == ["env=", "team=blue"]
    cli.run("keys", "tag", arn, "team=red", "cost=42")
    cli.run("keys", "untag", key, "env")
    assert cli.lines("keys", "tags", key) == ["cost=42", "team=red"]
    page = cli.json("keys", "tags", key, "--limit", "1")
    assert [t["TagKey"] for t in page["Tags"]] == ["cost"] and page["Truncated"]
    rest = cli.json("keys", "tags", key, "--limit", "1", "--marker", page["NextMarker"])
    assert [t["TagKey"] for t in rest["Tags"]] == ["team"] and not rest["Truncated"]
    seq_v1 = cli.head()
    trail_csv = cli.run("audit", "trail", "--limit", "1", "--csv").stdout.splitlines()
    created_time = dict(zip(*csv.reader(trail_csv), strict=True))["time"]
    cli.run("keys", "update-description", key, "--description", "v2")

    # aliases
    cli.run("aliases", "create", "alias/payroll", "--key", key)
    cli.run("aliases", "create", "alias/other", "--key", arn)
    seq_aliased = cli.head()
    assert cli.lines("aliases", "list") == [f"alias/other  {key}", f"alias/payroll  {key}"]
    first = cli.json("aliases", "list", "--limit", "1")
    assert [a["AliasName"] for a in first["Aliases"]] == ["alias/other"]
    second = cli.json("aliases", "list", "--limit", "1", "--marker", first["NextMarker"])
    assert [a["AliasName"] for a in second["Aliases"]] == ["alias/payroll"]
    assert "'v2'" in cli.run("keys", "describe", "alias/payroll").stdout
    other = cli.json("keys", "create", "--description", "other")["KeyMetadata"]["KeyId"]
    cli.run("aliases", "update", "alias/payroll", "--key", other)
    cli.run("aliases", "delete", "alias/other")
    assert cli.lines("aliases", "list") == [f"alias/payroll  {other}"]
    assert cli.lines("aliases", "list", "--key", key) == []
    unknown = cli.run("aliases", "list", "--key", "00000000-0000-4000-8000-000000000000", expect=1)
    assert "NotFoundException" in unknown.stderr and "does not exist" in unknown.stderr
    assert cli.lines("aliases", "list", "--at-seq", str(seq_aliased)) == [
        f"alias/other  {key}",
        f"alias/payroll  {key}",
    ]
    assert "'other'" in cli.run("keys", "describe", "alias/payroll").stdout
    # an alias resolves as it was then
    assert (
        "'v2'" in cli.run("keys", "describe", "alias/payroll", "--at-seq", str(seq_aliased)).stdout
    )

    # rotation
    assert cli.lines("keys", "rotation", "status", key) == ["disabled"]
    cli.run("keys", "rotation", "enable", key, "--period-days", "90")
    assert cli.lines("keys", "rotation", "status", key)[0].startswith("enabled  every 90 days")
    assert cli.lines("keys", "rotation", "list", key) == []
    assert cli.lines("keys", "rotate", key) == [f"rotated {arn}"]
    rotations = cli.lines("keys", "rotation", "list", key)
    assert len(rotations) == 1 and "  ON_DEMAND  " in rotations[0]
    cli.run("keys", "rotation", "disable", other)

    # policy
    default_policy = cli.run("keys", "policy", "get", key).stdout
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(POLICY)
    seq_before_policy = cli.head()
    cli.run("keys", "policy", "put", key, "--file", str(policy_file))
    assert cli.json("keys", "policy", "get", key)["Policy"] == POLICY
    assert cli.lines("keys", "policy", "list", key) == ["default"]
    assert (
        cli.run("keys", "policy", "get", key, "--at-seq", str(seq_before_policy)).stdout
        == default_policy
    )

    # grants
    app, ops = f"{ME}:role/app", f"{ME}:role/ops"
    g1 = cli.json(
        "grants", "create", "--key", key, "--grantee", app, "--operation", "Encrypt",
        "--operation", "Decrypt", "--retiring", ops, "--name", "g1",
        "--context-subset", "team=blue",
    )  # fmt: skip
    grant_id, token = cli.lines(
        "grants", "create", "--key", arn, "--grantee", f"{ME}:role/other",
        "--operation", "Decrypt", "--context-equals", "a=b",
    )  # fmt: skip
    assert len(grant_id) == 64 and token and g1["GrantToken"] != token
    listed = cli.lines("grants", "list", "--key", key)
    assert listed == [
        f"{g1['GrantId']}  {app}  Decrypt,Encrypt",
        f"{grant_id}  {ME}:role/other  Decrypt",
    ]
    assert cli.lines("grants", "list", "--key", key, "--grantee", app) == listed[:1]
    assert cli.lines("grants", "list", "--key", key, "--grant-id", grant_id) == listed[1:]
    page = cli.json("grants", "list", "--key", key, "--limit", "1")
    assert page["Truncated"] and len(page["Grants"]) == 1
    retirable = cli.lines("grants", "list-retirable", "--retiring", ops)
    assert retirable == [f"{arn}  {listed[0]}"]
    seq_granted = cli.head()
    cli.run("grants", "retire", "--token", g1["GrantToken"])
    cli.run("grants", "revoke", "--key", key, "--grant-id", grant_id)
    assert cli.lines("grants", "list", "--key", key) == []
    assert cli.lines("grants", "list", "--key", key, "--at-seq", str(seq_granted)) == listed
    g3 = cli.json("grants", "create", "--key", key, "--grantee", app, "--operation", "Encrypt")
    cli.run("grants", "retire", "--key", arn, "--grant-id", g3["GrantId"])

    # point in time: the earlier description, by seq and by time (Z and an offset)
    assert "'v1'" in cli.run("keys", "describe", key, "--at-seq", str(seq_v1)).stdout
    plus2 = datetime.fromisoformat(created_time).astimezone(timezone(timedelta(hours=2)))
    assert plus2.isoformat().endswith("+02:00")
    for as_of in (created_time, plus2.isoformat()):
        assert "'v1'" in cli.run("keys", "describe", key, "--as-of", as_of).stdout
    assert "'v2'" in cli.run("keys", "describe", key).stdout
    before = rfc3339(md["CreationDate"] - 60)
    assert cli.fails("keys", "describe", key, "--as-of", before).startswith(
        "error: NotFoundException: "
    )

    # deletion: cancel on one key, then schedule 7 days and let maintenance delete it
    cli.run("keys", "schedule-deletion", other, "--days", "7")
    cli.run("keys", "cancel-deletion", other)
    assert cli.json("keys", "describe", other)["KeyMetadata"]["KeyState"] == "Disabled"
    scheduled = cli.json("keys", "schedule-deletion", key, "--days", "7")
    assert scheduled["KeyState"] == "PendingDeletion" and scheduled["PendingWindowInDays"] == 7
    first = cli.lines("maintenance", "run")  # nothing to delete yet; the first checkpoint
    assert first[0].startswith("Checkpoint 1 size ") and first[0].endswith(" (events)"), first
    assert first[1:] == ["done: 0 rotated, 0 deleted"]
    assert cli.lines("maintenance", "run") == ["nothing due"]
    created = datetime.fromtimestamp(md["CreationDate"], tz=UTC)
    now = rfc3339((created + timedelta(days=8)).timestamp())
    later = cli.lines("maintenance", "run", "--now", now)
    assert later[0] == f"DeleteKey {arn}"
    assert later[1].startswith("Checkpoint 2 size ") and later[1].endswith(" (interval)")
    assert later[2:] == ["done: 0 rotated, 1 deleted"]
    assert cli.lines("maintenance", "run", "--now", now) == ["nothing due"]
    assert cli.fails("keys", "describe", key) == (
        f"error: NotFoundException: Key '{arn}' does not exist"
    )
    assert cli.lines("keys", "list") == [cli.json("keys", "describe", other)["KeyMetadata"]["Arn"]]
    assert "'v1'" in cli.run("keys", "describe", key, "--at-seq", str(seq_v1)).stdout
    assert "events (1 keys, 1 aliases) in " in cli.lines("projections", "rebuild")[0]
    trail = cli.run("audit", "trail", "--limit", "100").stdout
    for op in ("TagResource", "UntagResource", "UpdateKeyDescription", "CreateAlias",
               "UpdateAlias", "DeleteAlias", "EnableKeyRotation", "RotateKeyOnDemand",
               "PutKeyPolicy", "CreateGrant", "RetireGrant", "RevokeGrant",
               "ScheduleKeyDeletion", "CancelKeyDeletion", "DeleteKey"):  # fmt: skip
        assert f" {op} " in trail, op


BAD_INPUT = [
    # (command line, error name, recorded in the ledger as a failed API call; only
    # `maintenance run`, an operator command and no API call, is not)
    ("aliases create payroll --key {key}", "ValidationException", True),
    ("keys schedule-deletion {key} --days 6", "ValidationException", True),
    ("keys rotation enable {key} --period-days 89", "ValidationException", True),
    ("keys tags {key} --marker bogus", "InvalidMarkerException", True),
    ("aliases list --marker bogus", "InvalidMarkerException", True),
    ("keys list --limit 0", "ValidationException", True),
    ("keys describe {key} --as-of 2026-05-01", "ValidationException", True),
    ("keys describe {key} --as-of 2026-05-01T00:00:00", "ValidationException", True),
    ("maintenance run --now yesterday", "ValidationException", False),
    ("keys tag {key} novalue", "ValidationException", True),
    (
        "grants create --key {key} --grantee p --operation Encrypt --context-equals novalue",
        "ValidationException",
        True,
    ),
    ("grants retire --key {key}", "ValidationException", True),
    ("keys policy put {key} --file {bad_policy}", "MalformedPolicyDocumentException", True),
    ("keys describe alias/missing", "NotFoundException", True),
]


def test_bad_input_prints_one_error_line_exits_1_and_records_each_failed_api_call(
    cli: Cli, tmp_path: Path
) -> None:
    key = cli.json("keys", "create")["KeyMetadata"]["KeyId"]
    bad_policy = tmp_path / "bad.json"
    bad_policy.write_text("{not json")
    before = cli.head()
    for args, error, _ in BAD_INPUT:
        line = cli.fails(*args.format(key=key, bad_policy=bad_policy).split())
        assert line.startswith(f"error: {error}"), (args, line)
    recorded = [error for _, error, rec in BAD_INPUT if rec]
    assert cli.head() == before + len(recorded)
    out = cli.run("--json", "audit", "trail", "--limit", str(len(recorded))).stdout
    trail = [json.loads(line)["record"] for line in out.splitlines()]
    assert [e["errorCode"] for e in trail] == recorded


def test_aliases_of_a_deleted_key_are_deleted_with_it(cli: Cli) -> None:
    """AWS deletes every alias of a key when its waiting period ends."""
    md = cli.json("keys", "create")["KeyMetadata"]
    cli.run("aliases", "create", "alias/doomed", "--key", md["KeyId"])
    cli.run("keys", "schedule-deletion", md["KeyId"], "--days", "7")
    now = rfc3339(md["CreationDate"] + 8 * 86400)
    assert cli.lines("maintenance", "run", "--now", now)[0] == f"DeleteKey {md['Arn']}"
    assert cli.lines("aliases", "list") == []
