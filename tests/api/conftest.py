"""A real ``keyledger serve`` on loopback (subprocess: its own SoftHSM token, SQLite
ledger in a temp data dir), and helpers to make principals and boto3 clients for it.

Principals are made through the ``keyledger`` CLI on the same data dir, as an admin
would; the server sees them at once (the ledger is the only source of truth).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

BIN = Path(sys.executable).parent


def keyledger_bin() -> str:
    exe = BIN / "keyledger"
    return str(exe) if exe.exists() else "keyledger"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    region: str = "us-east-1"
    _principals: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def cli(self, *args: str, stdin: str | None = None, expect: int = 0) -> str:
        """Run the keyledger CLI on the server's data dir; returns stdout."""
        proc = subprocess.run(
            [keyledger_bin(), "--data-dir", str(self.data_dir), *args],
            input=stdin.encode() if stdin is not None else None,
            capture_output=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout.decode()

    def principal(
        self, name: str, *, account: str = "111122223333", kind: str = "user",
        policy: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Create (once per session) a principal; attach ``policy`` as "main" if given.
        Returns the CreatePrincipal response (AccessKeyId, SecretAccessKey, Principal)."""
        k = (account, name)
        if k not in self._principals:
            out = self.cli("--json", "principals", "create", name, "--account", account,
                           "--type", kind)  # fmt: skip
            self._principals[k] = json.loads(out)
        if policy is not None:
            self.cli(
                "principals", "attach-policy", name, "--account", account,
                "--policy-name", "main", "--policy", "-", stdin=json.dumps(policy),
            )  # fmt: skip
        return self._principals[k]

    def client(self, creds: dict[str, Any] | None = None, *, service: str = "kms",
               region: str | None = None, access_key: str | None = None,
               secret: str | None = None) -> Any:  # fmt: skip
        """A boto3 client signed with the principal's keys (or the given ones)."""
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=region or self.region,
            aws_access_key_id=access_key or (creds or {}).get("AccessKeyId", "AKIDEXAMPLE"),
            aws_secret_access_key=secret or (creds or {}).get("SecretAccessKey", "x" * 40),
            config=Config(retries={"max_attempts": 1}),
        )


@dataclass
class LedgerView:
    """Reads a server's SQLite ledger from the test process, without the HSM."""

    data_dir: Path

    def records_after(self, seq: int) -> list[dict[str, Any]]:
        from cli.context import CliContext
        from ledger.settings import Settings

        ledger = CliContext(settings=Settings(data_dir=self.data_dir)).ledger_without_hsm
        try:
            return [r.event() for r in ledger.db.read_records(seq, 100_000)]
        finally:
            ledger.close()

    def ledger_id(self) -> str:
        from cli.context import CliContext
        from ledger.settings import Settings

        ledger = CliContext(settings=Settings(data_dir=self.data_dir)).ledger_without_hsm
        try:
            return str(ledger.ledger_id)
        finally:
            ledger.close()

    def head(self) -> int:
        from cli.context import CliContext
        from ledger.settings import Settings

        ledger = CliContext(settings=Settings(data_dir=self.data_dir)).ledger_without_hsm
        try:
            return int(ledger.db.head_seq())
        finally:
            ledger.close()


def start_server(
    data_dir: Path,
    *extra: str,
    env_extra: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> Server:
    """Start ``keyledger serve`` on a free loopback port and wait for ``/health``.

    ``env_extra`` is added to the environment of the server and of ``Server.cli``
    (e.g. ``KEYLEDGER_DATABASE_URL``, which is otherwise removed). With ``log_path``
    the server's output goes to that file instead of a pipe nobody reads: use it for
    servers that answer many requests, whose access log would fill the pipe and block.
    """
    port = free_port()
    env = {**os.environ, "KEYLEDGER_DATA_DIR": str(data_dir)}
    env.pop("KEYLEDGER_DATABASE_URL", None)
    env.update(env_extra or {})
    log = log_path.open("wb") if log_path is not None else None
    try:
        proc = subprocess.Popen(
            [keyledger_bin(), "--data-dir", str(data_dir), "serve", "--port", str(port), *extra],
            env=env,
            stdout=log if log is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    finally:
        if log is not None:
            log.close()  # the child holds its own descriptor
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:  # loopback only
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            if log_path is not None:
                out = log_path.read_text(errors="replace")
            else:
                out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"keyledger serve did not start: {out[-2000:]}")
        time.sleep(0.1)
    return Server(url=url, data_dir=data_dir, proc=proc, env=env)


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One SigV4-authenticating server for the session."""
    base = tmp_path_factory.mktemp("api")
    server = start_server(base / "data", log_path=base / "serve.log")
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def admin(api_server: Server) -> dict[str, Any]:
    """A principal of account 111122223333 with an identity policy allowing kms:*."""
    return api_server.principal(
        "admin",
        policy={
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
        },
    )


@pytest.fixture(scope="session")
def kms(api_server: Server, admin: dict[str, Any]) -> Any:
    """A boto3 KMS client signed as ``admin``."""
    return api_server.client(admin)
