"""``keyledger principals`` and ``--as``: the CLI acts as a stored principal, and the
same authorization as the API applies to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_cli import Cli

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm]

ALLOW_CREATE = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["kms:CreateKey", "kms:Encrypt"], "Resource": "*"}],
}


def test_principal_lifecycle_and_acting_as_it(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "data")
    created = json.loads(cli("--json", "principals", "create", "alice").stdout)
    secret = created["SecretAccessKey"]
    assert created["Principal"]["Arn"] == "arn:aws:iam::111122223333:user/alice"
    assert created["AccessKeyId"].startswith("AKLD") and len(created["AccessKeyId"]) == 20
    assert len(secret) == 40

    # No identity policy: the default key policy delegates to IAM, which allows nothing.
    denied = cli("--as", "alice", "keys", "create", expect=1)
    assert denied.stderr.decode().startswith(
        "error: AccessDeniedException: User: arn:aws:iam::111122223333:user/alice is not "
        "authorized to perform: kms:CreateKey"
    )
    cli("principals", "attach-policy", "alice", "--policy-name", "kms", "--policy", "-",
        stdin=json.dumps(ALLOW_CREATE).encode())  # fmt: skip
    key = json.loads(cli("--json", "--as", "alice", "keys", "create").stdout)["KeyMetadata"]
    assert key["Arn"].startswith("arn:aws:kms:us-east-1:111122223333:key/")
    cli("--as", "alice", "encrypt", "--key", key["KeyId"], "--in", "-", "--out", "-",
        stdin=b"hello")  # fmt: skip
    # Decrypt is not in alice's policy: refused and recorded.
    blob = cli("encrypt", "--key", key["KeyId"], "--in", "-", "--out", "-", stdin=b"x").stdout
    refused = cli("--as", "alice", "decrypt", "--in", "-", "--out", "-", stdin=blob, expect=1)
    assert "AccessDeniedException" in refused.stderr.decode()

    # Point-in-time reads of the log are authorized as the current reads are.
    head = cli("--json", "keys", "list").stdout  # root may list
    assert key["KeyId"].encode() in head
    past = cli("--as", "alice", "keys", "describe", key["KeyId"], "--at-seq", "3", expect=1)
    assert "AccessDeniedException" in past.stderr.decode()
    policy = cli("--as", "alice", "keys", "policy", "get", key["KeyId"], "--at-seq", "3",
                 expect=1)  # fmt: skip
    assert "AccessDeniedException" in policy.stderr.decode()

    listed = json.loads(cli("--json", "principals", "list").stdout)["Principals"]
    assert [p["Arn"] for p in listed] == ["arn:aws:iam::111122223333:user/alice"]
    assert listed[0]["Policies"] == ["kms"]

    before_disable = int(cli("audit", "verify").stdout.split()[1])  # "OK: N events, ..."
    cli("principals", "disable", "alice")
    disabled = cli("--as", "alice", "keys", "create", expect=1)
    assert "AccessDeniedException" in disabled.stderr.decode()
    cli("principals", "delete", "alice")
    gone = cli("--as", "alice", "keys", "create", expect=1)
    assert "NotFoundException" in gone.stderr.decode()
    cli("principals", "create", "alice", expect=1)  # a deleted name is not reused
    # As it was: enabled with its policy before the disable, gone now.
    then = json.loads(
        cli("--json", "principals", "describe", "alice", "--at-seq", str(before_disable)).stdout
    )
    assert then["Enabled"] is True and then["PolicyDocuments"] == {"kms": json.dumps(ALLOW_CREATE)}
    past = cli("--json", "principals", "list", "--at-seq", str(before_disable)).stdout
    assert [p["Arn"] for p in json.loads(past)["Principals"]] == [created["Principal"]["Arn"]]
    assert json.loads(cli("--json", "principals", "list").stdout)["Principals"] == []
    cli("principals", "describe", "alice", expect=1)

    # The secret was printed once and is stored nowhere in clear.
    for f in (tmp_path / "data").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    trail = cli("audit", "trail").stdout.decode()
    for op in ("CreateUser", "PutPrincipalPolicy", "DisablePrincipal", "DeletePrincipal"):
        assert op in trail
    assert "AccessDeniedException" in trail
    assert cli("audit", "verify").stdout.decode().startswith("OK:")


READER = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": ["kms:ListKeys", "kms:DescribeKey"], "Resource": "*"}
    ],
}


def test_a_principals_cli_reads_are_recorded_as_read_only_calls(tmp_path: Path) -> None:
    """``--as NAME`` reads answered by the catalog or a replay are one recorded call
    each, as the API's are; the operator's own reads of the projections are not calls."""
    from tests.api.conftest import LedgerView

    cli = Cli(tmp_path / "data")
    view = LedgerView(tmp_path / "data")
    cli("principals", "create", "reader")
    cli("principals", "attach-policy", "reader", "--policy-name", "read", "--policy", "-",
        stdin=json.dumps(READER).encode())  # fmt: skip
    key = json.loads(cli("--json", "keys", "create").stdout)["KeyMetadata"]
    at = view.head()

    def records_of(*args: str) -> list[tuple[str, str, str | None]]:
        before = view.head()
        cli(*args)
        return [
            (r["call"]["operation"], r["topic"].rsplit(".", 1)[-1], r.get("key_arn"))
            for r in view.records_after(before)
        ]

    assert records_of("--as", "reader", "keys", "list", "--limit", "5") == [
        ("ListKeys", "Succeeded", None)
    ]
    assert records_of("--as", "reader", "keys", "describe", key["KeyId"], "--at-seq", str(at)) == [
        ("DescribeKey", "Succeeded", key["Arn"])
    ]
    assert records_of("keys", "list") == []  # the operator reading the projection
    before = view.head()
    cli("--as", "reader", "keys", "list", "--marker", "bad", expect=1)
    [failed] = view.records_after(before)
    assert failed["call"]["operation"] == "ListKeys"
    assert failed["error_code"] == "InvalidMarkerException"
    assert failed["request"] == {"marker": "bad"}
