"""Inline cryptographic calls (``keyledger serve --inline``): with SoftHSM2 they run on
the event loop and are answered only after the committer stored their records, in
groups; a failed or slow commit never lets a result out; other HSMs take worker
threads. Real ledger (SQLite) and SoftHSM2 (the session's token: one per process),
the app driven in process over ASGI."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.server import build_app, inline_enabled
from ledger.domain.model import ApiCall
from ledger.errors import ValidationError
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.settings import Settings

pytestmark = pytest.mark.softhsm

ACCOUNT = "111122223333"
AUTH = (
    f"AWS4-HMAC-SHA256 Credential={ACCOUNT}/20260101/us-east-1/kms/aws4_request, "
    "SignedHeaders=host, Signature=00"
)


def _ledger(app: Any) -> Any:
    return app.state.keyledger.ledger.ledger  # KmsBackend -> KeyLedger


@pytest.fixture
def make_app(tmp_path: Path, softhsm_keystore: Pkcs11KeyStore) -> Iterator[Callable[..., Any]]:
    """Build apps (dev mode, SQLite in ``tmp_path``) on the session's token; closes their
    ledgers afterwards (the shared keystore stays open)."""
    apps: list[Any] = []

    def make(inline: str, **options: Any) -> Any:
        settings = Settings(data_dir=tmp_path / "data")
        app = build_app(
            settings, dev=True, default_account=ACCOUNT, inline=inline,
            keystore=softhsm_keystore, **options,
        )  # fmt: skip
        apps.append(app)
        return app

    yield make
    for app in apps:
        _ledger(app).close()


@pytest.fixture
def on(make_app: Callable[..., Any]) -> Any:
    return make_app("on")


def _call(client: httpx.AsyncClient, operation: str, body: dict[str, Any]) -> Any:
    return client.post(
        "/",
        content=json.dumps(body).encode(),
        headers={
            "X-Amz-Target": f"TrentService.{operation}",
            "Content-Type": "application/x-amz-json-1.1",
            "Authorization": AUTH,
        },
    )


def _run(app: Any, calls: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://kms") as client:
            return list(await asyncio.gather(*(_call(client, op, b) for op, b in calls)))

    return asyncio.run(main())


def _key(app: Any) -> str:
    (response,) = _run(app, [("CreateKey", {})])
    assert response.status_code == 200, response.text
    key_id: str = response.json()["KeyMetadata"]["KeyId"]
    return key_id


def _spy_saves(app: Any, monkeypatch: pytest.MonkeyPatch, **behaviour: Any) -> list[int]:
    """Count the record-only saves (sizes), optionally slow (``delay``) or failing."""
    ledger = _ledger(app)
    real = ledger.save
    sizes: list[int] = []

    def save(*objs: Any, **kwargs: Any) -> Any:
        if objs and all(isinstance(o, ApiCall) for o in objs):
            sizes.append(len(objs))
            if behaviour.get("delay"):
                time.sleep(behaviour["delay"])
            if behaviour.get("fail"):
                raise OSError("disk full")
        return real(*objs, **kwargs)

    monkeypatch.setattr(ledger, "save", save)
    return sizes


def test_concurrent_inline_calls_are_answered_once_their_records_are_stored_together(
    on: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key(on)
    head = _ledger(on).db.head_seq()
    sizes = _spy_saves(on, monkeypatch, delay=0.3)  # the first save holds the committer
    plaintext = base64.b64encode(b"secret").decode()
    responses = _run(on, [("Encrypt", {"KeyId": key, "Plaintext": plaintext})] * 48)
    assert [r.status_code for r in responses] == [200] * 48
    assert _ledger(on).db.head_seq() == head + 48  # every answer's record is stored
    assert sum(sizes) == 48
    assert len(sizes) <= 3, sizes  # grouped: 48 requests, a few transactions


def test_a_failed_commit_answers_an_internal_error_and_never_the_result(
    on: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key(on)
    plaintext = base64.b64encode(b"never returned").decode()
    (made,) = _run(on, [("Encrypt", {"KeyId": key, "Plaintext": plaintext})])
    blob = made.json()["CiphertextBlob"]
    head = _ledger(on).db.head_seq()
    _spy_saves(on, monkeypatch, fail=True)
    responses = _run(
        on,
        [
            ("Encrypt", {"KeyId": key, "Plaintext": plaintext}),
            ("Decrypt", {"CiphertextBlob": blob}),
            ("GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"}),
            ("DescribeKey", {"KeyId": key}),  # a read: its record too, or no answer
        ],
    )
    for response in responses:
        assert response.status_code == 500
        assert response.json() == {
            "__type": "KMSInternalException",
            "message": "The ledger could not record the request.",
        }
    assert _ledger(on).db.head_seq() == head


def test_a_commit_slower_than_the_timeout_answers_503_and_still_stores_the_record(
    make_app: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The committer thread (PostgreSQL's): on SQLite the loop itself commits, and
    # nothing can time out while it does.
    app = make_app("on", request_timeout=0.2, commit_on_loop=False)
    key = _key(app)
    head = _ledger(app).db.head_seq()
    _spy_saves(app, monkeypatch, delay=0.6)
    plaintext = base64.b64encode(b"x").decode()
    (response,) = _run(app, [("Encrypt", {"KeyId": key, "Plaintext": plaintext})])
    assert response.status_code == 503
    assert response.json()["__type"] == "DependencyTimeoutException"
    deadline = time.monotonic() + 10
    while _ledger(app).db.head_seq() == head and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ledger(app).db.head_seq() == head + 1


@pytest.mark.parametrize(
    ("inline", "operation", "on_loop"),
    [
        ("on", "Encrypt", True),
        ("off", "Encrypt", False),
        ("on", "DescribeKey", True),  # a read of one key, from the key itself
        ("on", "ListKeys", False),  # the catalog is caught up: never on the loop
    ],
)
def test_the_inline_choice_decides_where_the_operation_runs(
    make_app: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    inline: str,
    operation: str,
    on_loop: bool,
) -> None:
    app = make_app(inline)
    key = _key(app)
    ledger = _ledger(app)
    threads: list[str] = []
    if operation == "ListKeys":
        ledger = app.state.keyledger.ledger  # KmsBackend: answered from its catalog
    name = {"Encrypt": "encrypt", "DescribeKey": "describe_key", "ListKeys": "list_keys"}
    real = getattr(ledger, name[operation])

    @functools.wraps(real)  # the API reads the method's signature
    def spy(**kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(**kwargs)

    monkeypatch.setattr(ledger, name[operation], spy)
    body: dict[str, Any] = {"KeyId": key}
    if operation == "Encrypt":
        body["Plaintext"] = base64.b64encode(b"x").decode()
    if operation == "ListKeys":
        body = {}
    (response,) = _run(app, [(operation, body)])
    assert response.status_code == 200, response.text
    # asyncio.run runs the loop in this test's thread
    assert (threads == [threading.current_thread().name]) is on_loop
    assert threads[0].startswith("keyledger-api") is not on_loop


def test_auto_runs_inline_with_softhsm_only(tmp_path: Path) -> None:
    embedded = Settings(data_dir=tmp_path)
    softhsm = Settings(data_dir=tmp_path, pkcs11_module="/usr/lib/softhsm/libsofthsm2.so")
    other = Settings(data_dir=tmp_path, pkcs11_module="/opt/cloudhsm/lib/libcloudhsm_pkcs11.so")
    assert inline_enabled(embedded) and inline_enabled(softhsm)
    assert not inline_enabled(other)
    assert inline_enabled(other, "on") and not inline_enabled(embedded, "off")
    with pytest.raises(ValidationError):
        inline_enabled(embedded, "sometimes")


def test_serve_with_inline_off_round_trips_and_a_bad_choice_is_refused(tmp_path: Path) -> None:
    from tests.api.conftest import keyledger_bin, start_server, stop_server

    server = start_server(tmp_path / "data", "--dev", "--inline", "off")
    try:
        kms = server.client({"AccessKeyId": ACCOUNT, "SecretAccessKey": "x" * 40})
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key, Plaintext=b"through a worker thread")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"through a worker thread"
    finally:
        stop_server(server)
    refused = subprocess.run(
        [keyledger_bin(), "--data-dir", str(tmp_path / "data"), "serve", "--inline", "maybe"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert b"--inline must be one of auto, on, off" in refused.stderr
