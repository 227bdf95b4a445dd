"""SigV4 refusals over HTTP: each is answered as AWS KMS answers it (HTTP 400 with the
AWS error name) and recorded in the ledger as exactly one ``ApiCall.Failed`` with that
error code, changing nothing else.

Requests are signed here with botocore's own ``SigV4Auth`` (at a chosen time, so a
stale date is still a correct signature) and sent raw with httpx, so each test can
break exactly one thing after or instead of signing.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.api.conftest import LedgerView, Server, start_server, stop_server

FAILED_TOPIC = "ApiCall.Failed"
ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
}


class _SigV4At(SigV4Auth):
    """botocore's SigV4 signer with the signing time given instead of read from the clock."""

    def __init__(self, credentials: Credentials, service: str, region: str, when: datetime):
        super().__init__(credentials, service, region)
        self._when = when

    def add_auth(self, request: AWSRequest) -> None:
        request.context["timestamp"] = self._when.strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        self._inject_signature_to_request(
            request, self.signature(self.string_to_sign(request, canonical), request)
        )


def signed(
    url: str,
    operation: str,
    body: bytes,
    *,
    access_key: str,
    secret: str,
    region: str = "us-east-1",
    service: str = "kms",
    when: datetime | None = None,
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a KMS JSON 1.1 request signed as botocore signs it."""
    request = AWSRequest(
        method="POST",
        url=url + "/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
        },
    )
    signer = _SigV4At(Credentials(access_key, secret), service, region, when or datetime.now(UTC))
    signer.add_auth(request)
    # Added after signing, as botocore does: unsigned, one per call.
    request.headers["amz-sdk-invocation-id"] = str(uuid.uuid4())
    return dict(request.headers.items()), body


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("signatures")
    srv = start_server(root / "data", log_path=root / "server.log")
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="module")
def creds(server: Server) -> dict[str, Any]:
    return server.principal("signer", policy=ALLOW_ALL)


@pytest.fixture(scope="module")
def key_id(server: Server, creds: dict[str, Any]) -> str:
    key_id: str = server.client(creds).create_key(Description="signatures")["KeyMetadata"]["KeyId"]
    return key_id


@pytest.fixture(scope="module")
def ledger(server: Server) -> LedgerView:
    return LedgerView(server.data_dir)


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def _keys(creds: dict[str, Any]) -> dict[str, str]:
    return {"access_key": creds["AccessKeyId"], "secret": creds["SecretAccessKey"]}


def _encrypt_body(key_id: str) -> bytes:
    plaintext = base64.b64encode(b"secret payload").decode()
    return json.dumps({"KeyId": key_id, "Plaintext": plaintext}).encode()


def _post(http: httpx.Client, headers: Mapping[str, str], body: bytes) -> httpx.Response:
    return http.post("/", headers=dict(headers), content=body)


def _assert_one_failure(
    ledger: LedgerView, before: int, *, code: str, operation: str, principal: str
) -> dict[str, Any]:
    new = ledger.records_after(before)
    assert len(new) == 1, [r["topic"] for r in new]
    record = new[0]
    assert record["topic"].endswith(FAILED_TOPIC)
    assert record["error_code"] == code
    assert record["call"]["operation"] == operation
    assert record["call"]["principal"] == principal
    assert record["call"]["source_ip"] == "127.0.0.1"
    return record


Builder = Callable[[Server, dict[str, Any], str], tuple[dict[str, str], bytes]]


def _wrong_secret(srv: Server, creds: dict[str, Any], key_id: str) -> tuple[dict[str, str], bytes]:
    return signed(
        srv.url, "Encrypt", _encrypt_body(key_id), access_key=creds["AccessKeyId"], secret="w" * 40
    )


def _body_changed(srv: Server, creds: dict[str, Any], key_id: str) -> tuple[dict[str, str], bytes]:
    headers, body = signed(srv.url, "Encrypt", _encrypt_body(key_id), **_keys(creds))
    changed = body.replace(base64.b64encode(b"secret payload"), base64.b64encode(b"other payload!"))
    assert changed != body and len(changed) == len(body)
    return headers, changed


def _stale_date(srv: Server, creds: dict[str, Any], key_id: str) -> tuple[dict[str, str], bytes]:
    return signed(
        srv.url,
        "Encrypt",
        _encrypt_body(key_id),
        **_keys(creds),
        when=datetime.now(UTC) - timedelta(minutes=10),
    )


def _s3_scope(srv: Server, creds: dict[str, Any], key_id: str) -> tuple[dict[str, str], bytes]:
    return signed(srv.url, "Encrypt", _encrypt_body(key_id), **_keys(creds), service="s3")


def _unknown_key(srv: Server, creds: dict[str, Any], key_id: str) -> tuple[dict[str, str], bytes]:
    return signed(
        srv.url,
        "Encrypt",
        _encrypt_body(key_id),
        access_key="AKIAUNKNOWNUNKNOWN00",
        secret="u" * 40,
    )


def _no_authorization(
    srv: Server, creds: dict[str, Any], key_id: str
) -> tuple[dict[str, str], bytes]:
    headers, body = _wrong_secret(srv, creds, key_id)
    return {k: v for k, v in headers.items() if k.lower() != "authorization"}, body


def _garbage_authorization(
    srv: Server, creds: dict[str, Any], key_id: str
) -> tuple[dict[str, str], bytes]:
    headers, body = _wrong_secret(srv, creds, key_id)
    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    return {**headers, "Authorization": "AWS4-HMAC-SHA256 garbage,,=;;"}, body


REFUSALS: list[tuple[str, Builder, str, str]] = [
    (
        "wrong_secret",
        _wrong_secret,
        "InvalidSignatureException",
        "The request signature we calculated does not match",
    ),
    (
        "body_changed_after_signing",
        _body_changed,
        "InvalidSignatureException",
        "The request signature we calculated does not match",
    ),
    ("stale_date", _stale_date, "InvalidSignatureException", "Signature expired: "),
    (
        "scope_for_s3",
        _s3_scope,
        "InvalidSignatureException",
        "Credential should be scoped to correct service: 'kms'.",
    ),
    (
        "unknown_access_key",
        _unknown_key,
        "UnrecognizedClientException",
        "The security token included in the request is invalid.",
    ),
    (
        "no_authorization",
        _no_authorization,
        "MissingAuthenticationTokenException",
        "Request is missing Authentication Token",
    ),
    (
        "garbage_authorization",
        _garbage_authorization,
        "IncompleteSignatureException",
        "'garbage' not a valid key=value pair (missing equal-sign) in Authorization header",
    ),
]


@pytest.mark.parametrize(
    ("build", "code", "message"),
    [pytest.param(b, c, m, id=name) for name, b, c, m in REFUSALS],
)
def test_refused_request_is_answered_400_and_recorded_once(
    server: Server,
    creds: dict[str, Any],
    key_id: str,
    ledger: LedgerView,
    http: httpx.Client,
    build: Builder,
    code: str,
    message: str,
) -> None:
    before = ledger.head()
    headers, body = build(server, creds, key_id)
    response = _post(http, headers, body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/x-amz-json-1.1"
    answer = response.json()
    assert answer["__type"] == code
    assert answer["message"].startswith(message)
    assert creds["SecretAccessKey"] not in response.text
    record = _assert_one_failure(
        ledger, before, code=code, operation="Encrypt", principal="anonymous"
    )
    assert record["error_message"] == answer["message"]
    assert record["request"] == {"keyId": key_id}  # nothing of the plaintext is kept


def test_exact_replay_is_refused_while_the_original_succeeded(
    server: Server, creds: dict[str, Any], key_id: str, ledger: LedgerView, http: httpx.Client
) -> None:
    headers, body = signed(server.url, "Encrypt", _encrypt_body(key_id), **_keys(creds))
    first = _post(http, headers, body)
    assert first.status_code == 200, first.text
    assert base64.b64decode(first.json()["CiphertextBlob"])
    before = ledger.head()
    replay = _post(http, headers, body)
    assert replay.status_code == 400
    assert replay.json() == {
        "__type": "InvalidSignatureException",
        "message": "Signature has already been used.",
    }
    _assert_one_failure(
        ledger, before, code="InvalidSignatureException", operation="Encrypt", principal="anonymous"
    )


def test_replay_on_a_new_connection_is_refused_too(
    server: Server, creds: dict[str, Any], key_id: str, ledger: LedgerView
) -> None:
    headers, body = signed(server.url, "Encrypt", _encrypt_body(key_id), **_keys(creds))
    with httpx.Client(base_url=server.url, timeout=30) as one:
        assert _post(one, headers, body).status_code == 200
    before = ledger.head()
    with httpx.Client(base_url=server.url, timeout=30) as two:
        replay = _post(two, headers, body)
    assert replay.status_code == 400
    assert replay.json()["__type"] == "InvalidSignatureException"
    _assert_one_failure(
        ledger, before, code="InvalidSignatureException", operation="Encrypt", principal="anonymous"
    )


def test_identical_calls_signed_in_one_second_are_told_apart_by_the_sdk_invocation_id(
    server: Server, creds: dict[str, Any], key_id: str, ledger: LedgerView, http: httpx.Client
) -> None:
    """Same second, same body: the same signature. Like botocore, each call carries its
    own unsigned ``amz-sdk-invocation-id``, so both are answered (AWS answers both)."""
    when = datetime.now(UTC)
    one, body = signed(
        server.url, "DescribeKey", json.dumps({"KeyId": key_id}).encode(), **_keys(creds), when=when
    )
    two, _ = signed(server.url, "DescribeKey", body, **_keys(creds), when=when)
    assert one["Authorization"] == two["Authorization"]
    assert _post(http, one, body).status_code == 200
    assert _post(http, two, body).status_code == 200
    before = ledger.head()
    assert _post(http, two, body).json()["__type"] == "InvalidSignatureException"
    _assert_one_failure(
        ledger,
        before,
        code="InvalidSignatureException",
        operation="DescribeKey",
        principal="anonymous",
    )


def test_plain_boto3_answers_identical_calls_in_a_tight_loop(
    server: Server, creds: dict[str, Any], key_id: str
) -> None:
    kms = server.client(creds)
    answers = [kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"] for _ in range(10)]
    assert len(set(answers)) == 1


def test_scope_region_selects_the_region_so_a_key_of_another_region_is_not_found(
    server: Server, creds: dict[str, Any], key_id: str, ledger: LedgerView
) -> None:
    """As in AWS, each region is its own KMS: the credential scope's region is the
    region the request acts in. A us-east-1 key does not exist in eu-west-1, whether
    addressed by key id or by its ARN."""
    arn = f"arn:aws:kms:us-east-1:111122223333:key/{key_id}"
    assert server.client(creds).describe_key(KeyId=key_id)["KeyMetadata"]["Arn"] == arn
    eu = server.client(creds, region="eu-west-1")
    for ref in (key_id, arn):
        before = ledger.head()
        with pytest.raises(ClientError) as err:
            eu.encrypt(KeyId=ref, Plaintext=b"x")
        assert err.value.response["Error"]["Code"] == "NotFoundException"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        record = _assert_one_failure(
            ledger,
            before,
            code="NotFoundException",
            operation="Encrypt",
            principal=creds["Principal"]["Arn"],
        )
        assert record["call"]["region"] == "eu-west-1"
    assert eu.list_keys()["Keys"] == []
