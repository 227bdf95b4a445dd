"""The `keyledger` command as a user runs it: real processes, SoftHSM2, SQLite."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.broker import TansuBroker

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm]

ROOT = Path(__file__).resolve().parents[2]


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

    def __call__(
        self, *args: str, stdin: bytes | None = None, expect: int = 0
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [*keyledger_cmd(), "--data-dir", str(self.data_dir), *args],
            input=stdin,
            capture_output=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        assert b"Traceback" not in proc.stderr
        return proc

    def head_count(self) -> int:
        out = self("audit", "verify").stdout.decode()
        assert out.startswith("OK: ")
        return int(out.split()[1])


def self_json(cli: Cli, *args: str) -> bytes:
    proc = subprocess.run(
        [*keyledger_cmd(), "--data-dir", str(cli.data_dir), "--json", *args],
        capture_output=True,
        env=cli.env,
        timeout=120,
        check=True,
    )
    return proc.stdout


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "data")


def test_cli_key_lifecycle_and_round_trip_through_files_and_pipes(cli: Cli, tmp_path: Path) -> None:
    created = json.loads(cli("--json", "keys", "create", "--description", "e2e").stdout)
    md = created["KeyMetadata"]
    assert md["KeyState"] == "Enabled" and md["KeySpec"] == "SYMMETRIC_DEFAULT"
    key = md["KeyId"]
    assert (cli.data_dir / "hsm.pin").stat().st_mode & 0o777 == 0o600
    assert cli("keys", "list").stdout.decode().split() == [md["Arn"]]
    assert b"Enabled" in cli("keys", "describe", key).stdout

    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"attack at dawn\n" * 200)
    blob = tmp_path / "blob.bin"
    cli(
        "encrypt",
        "--key",
        key,
        "--context",
        "app=e2e",
        "--context",
        "x=a=b",
        "--in",
        str(plain),
        "--out",
        str(blob),
    )
    assert b"attack" not in blob.read_bytes()
    out = cli("decrypt", "--context", "x=a=b", "--context", "app=e2e", "--in", str(blob)).stdout
    assert out == plain.read_bytes()

    b64 = cli("encrypt", "--key", md["Arn"], "--in", "-", stdin=b"\x00\x01binary").stdout
    base64.b64decode(b64.strip(), validate=True)
    assert cli("decrypt", "--key", key, stdin=b64).stdout == b"\x00\x01binary"

    cli("keys", "disable", key)
    assert (
        json.loads(cli("--json", "keys", "describe", key).stdout)["KeyMetadata"]["KeyState"]
        == "Disabled"
    )
    cli("keys", "enable", key)
    assert cli.head_count() == 7
    trail = cli("audit", "trail").stdout.decode()
    for op in ("CreateKey", "Encrypt", "Decrypt", "DisableKey", "EnableKey"):
        assert op in trail
    assert (
        "rebuilt catalog from 7 events (1 keys, 0 aliases)"
        in cli("projections", "rebuild").stdout.decode()
    )


@pytest.fixture(scope="module")
def bad_input_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cli, dict[str, str]]:
    """One ledger with the keys and files every bad-input case refers to."""
    tmp_path = tmp_path_factory.mktemp("bad-input")
    cli = Cli(tmp_path / "data")
    key = cli("keys", "create").stdout.decode().strip().rsplit("/", 1)[1]
    other = cli("keys", "create").stdout.decode().strip()
    disabled = cli("keys", "create").stdout.decode().strip()
    cli("keys", "disable", disabled)
    plain = tmp_path / "p"
    plain.write_bytes(b"hello")
    blob = tmp_path / "blob"
    cli("encrypt", "--key", key, "--context", "app=e2e", "--in", str(plain), "--out", str(blob))
    raw = blob.read_bytes()
    files = {
        "flipped": raw[:30] + bytes([raw[30] ^ 1]) + raw[31:],
        "truncated": raw[:-3],
        "big": b"x" * 4097,
        "empty": b"",
        "plain": b"hello",
    }
    for fname, data in files.items():
        (tmp_path / fname).write_bytes(data)
    values = {"key": key, "other": other, "disabled": disabled, "blob": str(blob)}
    values.update({f: str(tmp_path / f) for f in files})
    return cli, values


@pytest.mark.parametrize(
    ("name", "args", "error"),
    [
        (
            "unknown key",
            ["encrypt", "--key", "11111111-2222-4333-8444-555555555555"],
            "NotFoundException",
        ),
        ("disabled key", ["encrypt", "--key", "{disabled}"], "DisabledException"),
        (
            "wrong context",
            ["decrypt", "--context", "app=other", "--in", "{blob}"],
            "InvalidCiphertextException",
        ),
        ("missing context", ["decrypt", "--in", "{blob}"], "InvalidCiphertextException"),
        (
            "flipped byte",
            ["decrypt", "--context", "app=e2e", "--in", "{flipped}"],
            "InvalidCiphertextException",
        ),
        (
            "truncated blob",
            ["decrypt", "--context", "app=e2e", "--in", "{truncated}"],
            "InvalidCiphertextException",
        ),
        (
            "ciphertext of another key",
            ["decrypt", "--key", "{other}", "--context", "app=e2e", "--in", "{blob}"],
            "IncorrectKeyException",
        ),
        (
            "plaintext over 4096 bytes",
            ["encrypt", "--key", "{key}", "--in", "{big}"],
            "ValidationException",
        ),
        (
            "empty plaintext",
            ["encrypt", "--key", "{key}", "--in", "{empty}"],
            "ValidationException",
        ),
        (
            "malformed context",
            ["encrypt", "--key", "{key}", "--context", "novalue", "--in", "{empty}"],
            "ValidationException",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else None,
)
def test_cli_bad_input_prints_one_aws_error_line_exits_1_and_adds_one_failure_record(
    bad_input_ledger: tuple[Cli, dict[str, str]], name: str, args: list[str], error: str
) -> None:
    cli, values = bad_input_ledger
    full = [a.format(**values) for a in args]
    if "--in" not in full:
        full += ["--in", values["plain"]]
    before = cli.head_count()
    keys_before = cli("--json", "keys", "list").stdout

    proc = cli(*full, expect=1)
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {error}"), lines
    assert proc.stdout == b""
    assert cli.head_count() == before + 1
    last = json.loads(self_json(cli, "audit", "trail", "--limit", "1"))["record"]
    assert last["errorCode"] == error
    assert cli("--json", "keys", "list").stdout == keys_before


def test_usage_errors_exit_2_without_traceback(cli: Cli) -> None:
    proc = cli("encrypt", expect=2)
    assert b"--key" in proc.stderr


def test_demo_runs_end_to_end(cli: Cli) -> None:
    out = cli("demo").stdout.decode()
    lines = out.strip().splitlines()
    assert "Encrypt without an identity policy refused: AccessDeniedException" in out
    assert "Encrypt and Decrypt over HTTP (botocore, SigV4): plaintext matches" in out
    assert "audit verify: OK: 13 events" in out
    assert "usage index over 13 events: the key's calls OK 7, AccessDeniedException 1" in out
    assert "signed checkpoint 1 in the HSM (Ed25519, C2SP signed note): 13 records" in out
    assert "offline verify: 13 records valid, 1 checkpoints valid" in out
    assert "streamed 13 CloudTrail records to keyledger.audit.v1 (a second pass sent 0)" in out
    assert "read back 13 records, seq 1..13 each once" in out
    assert lines[-1].endswith("demo complete")


@pytest.mark.kafka
def test_stream_once_publishes_every_event_once_and_a_rerun_publishes_nothing(
    cli: Cli, kafka_broker: TansuBroker
) -> None:
    from consumers.relay import AUDIT_TOPIC, read_topic

    key = cli("keys", "create").stdout.decode().strip()
    cli("encrypt", "--key", key, "--context", "a=b", stdin=b"streamed")
    cli("decrypt", "--key", key, stdin=b"not a blob", expect=1)
    n = cli.head_count()
    out = cli("stream", "--bootstrap", kafka_broker.bootstrap, "--once").stdout.decode()
    assert out.strip() == f"published {n} records to {AUDIT_TOPIC}"
    again = cli("stream", "--bootstrap", kafka_broker.bootstrap, "--once").stdout.decode()
    assert again.strip() == f"published 0 records to {AUDIT_TOPIC}"
    values = [json.loads(r.value) for r in read_topic(kafka_broker.bootstrap, AUDIT_TOPIC)]
    mine = [v for v in values if v["record"]["resources"][0]["ARN"] == key] if values else []
    assert sorted(v["seq"] for v in values) == list(range(1, n + 1))
    assert [v["record"]["eventName"] for v in sorted(mine, key=lambda v: v["seq"])] == [
        "CreateKey",
        "Encrypt",
        "Decrypt",
    ]
    assert mine[-1]["record"]["errorCode"] == "InvalidCiphertextException"
