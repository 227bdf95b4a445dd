"""``keyledger serve --workers 2`` on one PostgreSQL schema: concurrent boto3 Encrypts
from 8 threads all succeed, the shared ledger's chain verifies with exactly one event
per call, concurrent GetKeyLastUsage calls (the usage index caught up by whichever
worker answers) agree on the last Encrypt, and SIGTERM shuts the server down gracefully
(exit code 0).

Which worker answered a request is not visible to a client (no response header says,
and none is added for tests), so the test checks that two worker processes run, not
that both served."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.context import CliContext
from ledger.chain import verify_chain
from ledger.settings import Settings
from tests.api.conftest import Server, start_server, stop_server

PG_BASE_URL = os.environ.get(
    "KEYLEDGER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
THREADS = 8
ENCRYPTS = 200
ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
}

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL naming a fresh PostgreSQL schema, dropped after the test. Under CI=true a
    missing PostgreSQL fails the test instead of skipping it."""
    import psycopg

    schema = "kl_test_" + uuid.uuid4().hex[:12]
    try:
        conn = psycopg.connect(PG_BASE_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_BASE_URL} is required under CI: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    with conn:
        yield f"{PG_BASE_URL}?schema={schema}"
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def workers(tmp_path: Path, pg_url: str) -> Iterator[Server]:
    srv = start_server(
        tmp_path / "data", "--workers", "2",
        env_extra={"KEYLEDGER_DATABASE_URL": pg_url}, log_path=tmp_path / "server.log",
    )  # fmt: skip
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            stop_server(srv)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _verify(srv: Server) -> tuple[int, int]:
    """(events verified, head seq) of the server's PostgreSQL ledger, without the HSM."""
    settings = Settings(data_dir=srv.data_dir, database_url=srv.env["KEYLEDGER_DATABASE_URL"])
    ledger = CliContext(settings=settings).ledger_without_hsm
    try:
        db = ledger.db
        result = verify_chain(db.iter_chain(), db.iter_events())
        return int(result.count), int(db.head_seq())
    finally:
        ledger.close()


def test_two_workers_share_one_postgres_ledger_and_stop_on_sigterm(workers: Server) -> None:
    assert len(_children(workers.proc.pid)) >= 2  # uvicorn's supervisor and its workers
    creds = workers.principal("loader", policy=ALLOW_ALL)
    key_id = workers.client(creds).create_key(Description="workers")["KeyMetadata"]["KeyId"]
    _, before = _verify(workers)

    errors: list[BaseException] = []
    blobs: list[bytes] = []
    request_ids: set[str] = set()
    lock = threading.Lock()

    def run(n: int) -> None:
        kms = workers.client(creds)
        try:
            for i in range(n):
                out = kms.encrypt(KeyId=key_id, Plaintext=b"payload %d" % i)
                with lock:
                    blobs.append(out["CiphertextBlob"])
                    request_ids.add(out["ResponseMetadata"]["RequestId"])
        except BaseException as exc:
            with lock:
                errors.append(exc)

    share = [ENCRYPTS // THREADS + (t < ENCRYPTS % THREADS) for t in range(THREADS)]
    threads = [threading.Thread(target=run, args=(n,)) for n in share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(blobs) == ENCRYPTS

    count, head = _verify(workers)
    assert head == before + ENCRYPTS  # one ApiCall.Succeeded per Encrypt, nothing else
    assert count == head
    out = workers.cli("audit", "verify")
    assert out.startswith(f"OK: {head} events")

    # GetKeyLastUsage from both workers at once: each catches the shared usage index up
    # (one writer at a time) and names one of the Encrypts.
    last: list[dict[str, object]] = []

    def last_usage() -> None:
        try:
            used = workers.client(creds).get_key_last_usage(KeyId=key_id)["KeyLastUsage"]
            with lock:
                last.append(used)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    readers = [threading.Thread(target=last_usage) for _ in range(6)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert errors == [] and len(last) == 6
    assert {used["Operation"] for used in last} == {"Encrypt"}
    assert len({used["KmsRequestId"] for used in last}) == 1
    assert last[0]["KmsRequestId"] in request_ids

    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(timeout=15) == 0
