"""The ASGI app against a fake ledger and a fake authenticator (no I/O).

Requests are built with botocore's own serializers and answers parsed with botocore's
parsers, so what passes here is what boto3 sends and understands.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import botocore.parsers
import botocore.serialize
import botocore.session
import orjson
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from api.app import RequestParts, create_app
from ledger.errors import (
    KeyLedgerError,
    LedgerUnavailableError,
    MissingAuthenticationTokenError,
    NotFoundError,
    UnrecognizedClientError,
)
from ledger.service import Caller

SESSION = botocore.session.get_session()
KMS = SESSION.get_service_model("kms")
STS = SESSION.get_service_model("sts")
ALICE = "arn:aws:iam::111122223333:user/alice"
ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
AUTH = (
    "AWS4-HMAC-SHA256 Credential=AKIAALICE0000000/20240101/us-east-1/kms/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=00"
)
SECRET_TEXT = "s3cr3t-in-exception"


class FakeLedger:
    """Records calls; answers AWS-shaped dicts; ``record_rejected`` appends."""

    def __init__(self, name: str = "first") -> None:
        self.name = name
        self.calls: list[tuple[str, Caller, dict[str, Any]]] = []
        self.rejected: list[dict[str, Any]] = []
        self.encrypt_raises: BaseException | None = None
        self.record_fails = False
        self.sleep = 0.0

    def encrypt(
        self,
        *,
        caller: Caller,
        key_id: str,
        plaintext: bytes,
        encryption_context: dict[str, str] | None = None,
        encryption_algorithm: str | None = None,
    ) -> dict[str, Any]:
        self.calls.append(("Encrypt", caller, {"key_id": key_id, "plaintext": plaintext}))
        if self.sleep:
            time.sleep(self.sleep)
        if self.encrypt_raises is not None:
            raise self.encrypt_raises
        return {
            "CiphertextBlob": b"ct:" + plaintext,
            "KeyId": ARN,
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "LedgerSeq": 17,  # not in the output shape: dropped
        }

    def record_rejected(
        self, *, operation: str, caller: Caller, request: dict[str, Any], error: KeyLedgerError
    ) -> None:
        if self.record_fails:
            raise LedgerUnavailableError("The ledger could not record the request.")
        self.rejected.append(
            {"operation": operation, "caller": caller, "request": request, "error": error}
        )


class FakeAuthenticator:
    """Accepts any Authorization header except the access key BADKEY."""

    def __init__(self) -> None:
        self.services: list[str] = []
        self.raises: BaseException | None = None

    def authenticate(self, req: RequestParts, *, service: str) -> Caller:
        self.services.append(service)
        if self.raises is not None:
            raise self.raises
        header = req.header("Authorization")
        if header is None:
            raise MissingAuthenticationTokenError("Missing Authentication Token")
        if "Credential=BADKEY/" in header:
            raise UnrecognizedClientError("The security token included in the request is invalid.")
        return Caller(
            principal=ALICE,
            source_ip=req.client_ip,
            user_agent=req.header("user-agent"),
            access_key_id="AKIAALICE0000000",
            account_id="111122223333",
        )


def make_app(**options: Any) -> tuple[Starlette, FakeLedger, FakeAuthenticator]:
    ledger = FakeLedger()
    auth = FakeAuthenticator()
    return create_app(ledger=ledger, authenticator=auth, **options), ledger, auth


@pytest.fixture
def setup() -> tuple[TestClient, FakeLedger, FakeAuthenticator]:
    app, ledger, auth = make_app()
    return TestClient(app, raise_server_exceptions=False), ledger, auth


def kms_request(operation: str, params: dict[str, Any], auth: str | None = AUTH) -> dict[str, Any]:
    serializer = botocore.serialize.create_serializer("json")
    request: dict[str, Any] = serializer.serialize_to_request(
        params, KMS.operation_model(operation)
    )
    headers = dict(request["headers"])
    if auth is not None:
        headers["Authorization"] = auth
    return {"content": request["body"], "headers": headers}


def parse(service: Any, operation: str, response: Any, protocol: str = "json") -> dict[str, Any]:
    parser = botocore.parsers.create_parser(protocol)
    parsed: dict[str, Any] = parser.parse(
        {
            "status_code": response.status_code,
            "headers": dict(response.headers),
            "body": response.content,
        },
        service.operation_model(operation).output_shape,
    )
    return parsed


def assert_request_id(response: Any) -> str:
    value = response.headers["x-amzn-RequestId"]
    assert str(uuid.UUID(value)) == value
    return str(value)


# ------------------------------------------------------------------ KMS JSON


def test_encrypt_through_botocore_serializer_and_parser(setup: Any) -> None:
    client, ledger, auth = setup
    response = client.post(
        "/", **kms_request("Encrypt", {"KeyId": "alias/app", "Plaintext": b"hi"})
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-amz-json-1.1"
    assert_request_id(response)
    assert "LedgerSeq" not in response.json()
    parsed = parse(KMS, "Encrypt", response)
    assert parsed["CiphertextBlob"] == b"ct:hi"
    assert parsed["KeyId"] == ARN
    (operation, caller, kwargs) = ledger.calls[0]
    assert operation == "Encrypt"
    assert caller.principal == ALICE
    assert kwargs == {"key_id": "alias/app", "plaintext": b"hi"}
    assert auth.services == ["kms"]
    assert ledger.rejected == []


def test_every_response_has_a_fresh_request_id(setup: Any) -> None:
    client, _, _ = setup
    encrypt = kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"x"})
    ids = {
        assert_request_id(client.post("/", **encrypt)),
        assert_request_id(client.get("/health")),
        assert_request_id(client.get("/nowhere")),
        assert_request_id(client.post("/", content=b"{}")),
    }
    assert len(ids) == 4


def test_unknown_target_is_rejected_and_recorded_as_unknown(setup: Any) -> None:
    client, ledger, _ = setup
    request = kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"x"})
    request["headers"]["X-Amz-Target"] = "TrentService.MakeCoffee"
    response = client.post("/", **request)
    assert response.status_code == 400
    assert parse(KMS, "Encrypt", response)["Error"]["Code"] == "UnknownOperationException"
    assert [r["operation"] for r in ledger.rejected] == ["Unknown"]
    assert ledger.rejected[0]["caller"].principal == ALICE
    assert ledger.calls == []


@pytest.mark.parametrize("target", [None, "DynamoDB_20120810.Encrypt", "Encrypt"])
def test_missing_or_foreign_target_is_unknown_operation(setup: Any, target: str | None) -> None:
    client, ledger, _ = setup
    headers = {"Authorization": AUTH, "Content-Type": "application/x-amz-json-1.1"}
    if target is not None:
        headers["X-Amz-Target"] = target
    response = client.post("/", content=b"{}", headers=headers)
    assert response.status_code == 400
    assert response.json()["__type"] == "UnknownOperationException"
    assert len(ledger.rejected) == 1


def test_auth_error_is_recorded_once_with_the_operation_and_the_access_key(setup: Any) -> None:
    client, ledger, _ = setup
    request = kms_request(
        "Encrypt",
        {"KeyId": "alias/app", "Plaintext": b"plain"},
        auth=AUTH.replace("AKIAALICE0000000", "BADKEY"),
    )
    request["headers"]["User-Agent"] = "Boto3/1.35 test"
    response = client.post("/", **request)
    assert response.status_code == 400
    error = parse(KMS, "Encrypt", response)["Error"]
    assert error["Code"] == "UnrecognizedClientException"
    assert error["Message"] == "The security token included in the request is invalid."
    assert len(ledger.rejected) == 1
    record = ledger.rejected[0]
    assert record["operation"] == "Encrypt"
    assert record["caller"].principal == "anonymous"
    assert record["caller"].access_key_id == "BADKEY"
    assert record["caller"].user_agent == "Boto3/1.35 test"
    assert record["caller"].source_ip == "testclient"
    assert record["request"] == {"keyId": "alias/app"}
    assert ledger.calls == []


def test_missing_authentication_is_rejected_and_recorded(setup: Any) -> None:
    client, ledger, _ = setup
    response = client.post("/", **kms_request("DescribeKey", {"KeyId": "k"}, auth=None))
    assert response.json()["__type"] == "MissingAuthenticationTokenException"
    assert ledger.rejected[0]["operation"] == "DescribeKey"
    assert ledger.rejected[0]["caller"].access_key_id is None


def test_invalid_body_is_recorded_with_only_the_key_id(setup: Any) -> None:
    client, ledger, _ = setup
    headers = kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"x"})["headers"]
    raw = orjson.dumps({"KeyId": "alias/app", "Plaintext": "cGxhaW4=", "Bogus": 1})
    response = client.post("/", content=raw, headers=headers)
    assert response.status_code == 400
    assert response.json()["__type"] == "SerializationException"
    assert ledger.rejected[0]["request"] == {"keyId": "alias/app"}
    assert ledger.rejected[0]["caller"].principal == ALICE
    assert ledger.calls == []


def test_validation_error_answers_aws_wording(setup: Any) -> None:
    client, ledger, _ = setup
    headers = kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"x"})["headers"]
    response = client.post("/", content=b'{"Plaintext": "eA=="}', headers=headers)
    assert response.json() == {
        "__type": "ValidationException",
        "message": "1 validation error detected: Value null at 'keyId' failed to satisfy "
        "constraint: Member must not be null",
    }
    assert ledger.rejected[0]["error"].aws_name == "ValidationException"


def test_unsupported_members_and_operations_are_recorded(setup: Any) -> None:
    client, ledger, _ = setup
    multi = kms_request("CreateKey", {"MultiRegion": True})
    assert client.post("/", **multi).json()["__type"] == "UnsupportedOperationException"
    store = kms_request("DescribeCustomKeyStores", {})
    answer = client.post("/", **store).json()
    assert answer == {
        "__type": "UnsupportedOperationException",
        "message": "DescribeCustomKeyStores is not supported by KeyLedger.",
    }
    assert [r["operation"] for r in ledger.rejected] == ["CreateKey", "DescribeCustomKeyStores"]


def test_operation_error_is_answered_but_not_recorded_twice(setup: Any) -> None:
    client, ledger, _ = setup
    ledger.encrypt_raises = NotFoundError("Key 'k' does not exist")
    response = client.post("/", **kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"x"}))
    assert response.status_code == 400
    error = parse(KMS, "Encrypt", response)["Error"]
    assert error == {"Code": "NotFoundException", "Message": "Key 'k' does not exist"}
    assert ledger.rejected == []  # the service recorded it


def test_ledger_unavailable_in_the_operation_is_500(setup: Any) -> None:
    client, ledger, _ = setup
    ledger.encrypt_raises = LedgerUnavailableError("The ledger could not record the request.")
    response = client.post("/", **kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"x"}))
    assert response.status_code == 500
    assert response.json()["__type"] == "KMSInternalException"


def test_unexpected_exception_is_500_without_leaking_its_message(
    setup: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, ledger, _ = setup
    ledger.encrypt_raises = RuntimeError(SECRET_TEXT)
    with caplog.at_level(logging.ERROR, logger="keyledger.api"):
        response = client.post(
            "/", **kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"PLAINTEXT-BYTES"})
        )
    assert response.status_code == 500
    assert response.json() == {
        "__type": "KMSInternalException",
        "message": "An internal error occurred.",
    }
    assert SECRET_TEXT not in response.text
    assert "RuntimeError" in caplog.text
    assert SECRET_TEXT not in caplog.text
    assert "PLAINTEXT" not in caplog.text
    # the failed attempt is still in the log, as an internal error
    assert [r["error"].aws_name for r in ledger.rejected] == ["KMSInternalException"]


def test_unexpected_exception_in_the_authenticator_is_500_and_recorded(setup: Any) -> None:
    client, ledger, auth = setup
    auth.raises = RuntimeError(SECRET_TEXT)
    response = client.post("/", **kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"x"}))
    assert response.status_code == 500
    assert SECRET_TEXT not in response.text
    assert ledger.rejected[0]["caller"].principal == "anonymous"


def test_a_rejection_that_cannot_be_recorded_answers_500(setup: Any) -> None:
    client, ledger, _ = setup
    ledger.record_fails = True
    response = client.post("/", **kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"x"}, None))
    assert response.status_code == 500
    assert response.json() == {
        "__type": "KMSInternalException",
        "message": "An internal error occurred.",
    }


def test_an_operation_slower_than_the_timeout_answers_503_and_is_not_recorded() -> None:
    app, ledger, _ = make_app(request_timeout=0.2)
    ledger.sleep = 1.0
    client = TestClient(app, raise_server_exceptions=False)
    started = time.monotonic()
    response = client.post("/", **kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"x"}))
    assert time.monotonic() - started < 0.9
    assert response.status_code == 503
    assert response.json()["__type"] == "DependencyTimeoutException"
    assert ledger.rejected == []


# ------------------------------------------------------------------ body limit


def test_declared_oversize_body_is_rejected_and_recorded() -> None:
    app, ledger, _ = make_app(max_body=1024)
    client = TestClient(app)
    request = kms_request("Encrypt", {"KeyId": "alias/app", "Plaintext": b"x" * 2000})
    response = client.post("/", **request)
    assert response.status_code == 400
    assert response.json()["__type"] == "ValidationException"
    assert "1024" in response.json()["message"]
    assert ledger.rejected[0]["operation"] == "Encrypt"
    assert ledger.rejected[0]["request"] == {}  # the body was never read
    assert ledger.calls == []


def test_streamed_oversize_body_stops_reading_at_the_limit() -> None:
    app, ledger, _ = make_app(max_body=100_000)
    chunk = b"x" * 16_384
    received = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        if received > 1000:  # an endless body: the app must stop long before this
            raise AssertionError("read past the limit")
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"x-amz-target", b"TrentService.Encrypt"),
            (b"content-type", b"application/x-amz-json-1.1"),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }
    asyncio.run(app(scope, receive, send))
    assert received <= 100_000 // len(chunk) + 2
    start = next(m for m in messages if m["type"] == "http.response.start")
    assert start["status"] == 400
    assert any(k.lower() == b"x-amzn-requestid" for k, _ in start["headers"])
    assert ledger.rejected[0]["error"].aws_name == "ValidationException"


# ------------------------------------------------------------------ STS


def sts_request(params: dict[str, Any] | None = None, auth: str | None = AUTH) -> dict[str, Any]:
    serializer = botocore.serialize.create_serializer("query")
    request = serializer.serialize_to_request(
        params or {}, STS.operation_model("GetCallerIdentity")
    )
    headers = dict(request["headers"])
    if auth is not None:
        headers["Authorization"] = auth.replace("/kms/", "/sts/")
    return {"data": request["body"], "headers": headers}


def test_sts_get_caller_identity_parses_in_botocore(setup: Any) -> None:
    client, ledger, auth = setup
    response = client.post("/", **sts_request())
    assert response.status_code == 200
    request_id = assert_request_id(response)
    parsed = parse(STS, "GetCallerIdentity", response, "query")
    assert parsed["Arn"] == ALICE
    assert parsed["Account"] == "111122223333"
    assert parsed["UserId"] == "AKIAALICE0000000"
    assert parsed["ResponseMetadata"]["RequestId"] == request_id
    assert auth.services == ["sts"]
    assert ledger.rejected == []


def test_sts_other_actions_are_invalid_action(setup: Any) -> None:
    client, ledger, _ = setup
    headers = {"Authorization": AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    response = client.post("/", content=b"Action=AssumeRole&Version=2011-06-15", headers=headers)
    assert response.status_code == 400
    error = parse(STS, "GetCallerIdentity", response, "query")["Error"]
    assert error["Code"] == "InvalidAction"
    assert error["Type"] == "Sender"
    assert ledger.rejected[0]["error"].aws_name == "InvalidAction"


def test_sts_auth_errors_use_sts_codes(setup: Any) -> None:
    client, ledger, _ = setup
    response = client.post("/", **sts_request(auth=AUTH.replace("AKIAALICE0000000", "BADKEY")))
    assert response.status_code == 403
    error = parse(STS, "GetCallerIdentity", response, "query")["Error"]
    assert error["Code"] == "InvalidClientTokenId"
    assert ledger.rejected[0]["operation"] == "GetCallerIdentity"


# ------------------------------------------------------------------ health, reset


def test_health_answers_ok(setup: Any) -> None:
    client, _, _ = setup
    for path in ("/health", "/_health", "/"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_health_reports_an_unreachable_ledger() -> None:
    def down() -> None:
        raise OSError("database is gone")

    app, _, _ = make_app(health=down)
    response = TestClient(app).get("/health")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable"}


def test_reset_is_not_served_outside_dev_mode() -> None:
    app, _, _ = make_app(reset=lambda: None)
    response = TestClient(app).post("/moto-api/reset")
    assert response.status_code == 404


def test_reset_in_dev_mode_swaps_in_the_new_ledger() -> None:
    fresh = FakeLedger("second")
    fresh_auth = FakeAuthenticator()
    resets: list[int] = []

    def reset() -> tuple[FakeLedger, FakeAuthenticator]:
        resets.append(1)
        return fresh, fresh_auth

    app, old, _ = make_app(dev=True, reset=reset)
    client = TestClient(app)
    response = client.post("/moto-api/reset")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert resets == [1]
    client.post("/", **kms_request("Encrypt", {"KeyId": "k", "Plaintext": b"x"}))
    assert old.calls == []
    assert len(fresh.calls) == 1
    assert fresh_auth.services == ["kms"]
    assert app.state.keyledger.ledger is fresh


def test_shutdown_hook_runs_on_lifespan_shutdown() -> None:
    closed = threading.Event()
    app, _, _ = make_app(on_shutdown=closed.set)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert not closed.is_set()
    assert closed.is_set()
