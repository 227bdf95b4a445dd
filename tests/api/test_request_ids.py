"""The request id an SDK gets back (``x-amzn-RequestId``, botocore's
``ResponseMetadata.RequestId``) is the ``requestID`` of the call's record, as in AWS, for
successes and failures, inline and worker-thread operations, and failed
authentication."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.api.conftest import LedgerView, Server

pytestmark = pytest.mark.softhsm


def _request_ids(view: LedgerView, before: int) -> list[str]:
    return [r["call"]["request_id"] for r in view.records_after(before) if r.get("call")]


def test_the_answered_request_id_is_the_records_request_id(
    api_server: Server, admin: dict[str, Any]
) -> None:
    view = LedgerView(api_server.data_dir)
    kms = api_server.client(admin)
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    nobody = api_server.principal("request-ids-nobody")  # no policy: denied everything

    answered: list[str] = []
    before = view.head()
    out = kms.encrypt(KeyId=key, Plaintext=b"x")  # inline
    answered.append(out["ResponseMetadata"]["RequestId"])
    with pytest.raises(ClientError) as denied:
        api_server.client(nobody).encrypt(KeyId=key, Plaintext=b"x")
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
    answered.append(denied.value.response["ResponseMetadata"]["RequestId"])
    with pytest.raises(ClientError) as missing:  # a worker-thread operation
        kms.describe_key(KeyId="1234abcd-12ab-34cd-56ef-1234567890ab")
    assert missing.value.response["Error"]["Code"] == "NotFoundException"
    answered.append(missing.value.response["ResponseMetadata"]["RequestId"])
    with pytest.raises(ClientError) as forged:  # failed authentication
        api_server.client(admin, secret="x" * 40).encrypt(KeyId=key, Plaintext=b"x")
    assert forged.value.response["Error"]["Code"] == "InvalidSignatureException"
    answered.append(forged.value.response["ResponseMetadata"]["RequestId"])

    assert _request_ids(view, before) == answered
    assert len(set(answered)) == 4


def test_an_oversize_body_is_answered_with_its_records_request_id(api_server: Server) -> None:
    import httpx

    view = LedgerView(api_server.data_dir)
    before = view.head()
    response = httpx.post(
        api_server.url + "/",
        content=b"{" + b" " * (1_048_576 + 10) + b"}",
        headers={
            "X-Amz-Target": "TrentService.Encrypt",
            "Content-Type": "application/x-amz-json-1.1",
        },
        timeout=30,
    )
    assert response.status_code == 400
    assert _request_ids(view, before) == [response.headers["x-amzn-requestid"]]
