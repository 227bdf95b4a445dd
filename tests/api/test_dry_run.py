"""DryRun: every check runs (validation, authorization, key state, the cryptography),
nothing succeeds or changes, and the attempt is recorded with DryRunOperationException,
as AWS KMS answers and CloudTrail records it."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.api.conftest import LedgerView, Server


def _code(call: Any, **kwargs: Any) -> str:
    with pytest.raises(ClientError) as err:
        call(**kwargs)
    return str(err.value.response["Error"]["Code"])


def test_dry_runs_check_everything_and_change_nothing(api_server: Server, kms: Any) -> None:
    key = kms.create_key(Description="dry run")["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext={"a": "b"})["CiphertextBlob"]
    before = LedgerView(api_server.data_dir).head()

    assert _code(kms.encrypt, KeyId=key, Plaintext=b"x", DryRun=True) == (
        "DryRunOperationException"
    )
    ok = {"CiphertextBlob": blob, "EncryptionContext": {"a": "b"}, "DryRun": True}
    assert _code(kms.decrypt, **ok) == "DryRunOperationException"
    # The checks still run: a wrong context fails as without DryRun.
    wrong = {**ok, "EncryptionContext": {"a": "c"}}
    assert _code(kms.decrypt, **wrong) == "InvalidCiphertextException"
    grant = {"KeyId": key, "GranteePrincipal": "arn:aws:iam::111122223333:user/g",
             "Operations": ["Decrypt"], "DryRun": True}  # fmt: skip
    assert _code(kms.create_grant, **grant) == "DryRunOperationException"

    records = LedgerView(api_server.data_dir).records_after(before)
    assert kms.list_grants(KeyId=key)["Grants"] == []
    codes = [(r["call"]["operation"], r.get("error_code")) for r in records]
    assert codes == [
        ("Encrypt", "DryRunOperationException"),
        ("Decrypt", "DryRunOperationException"),
        ("Decrypt", "InvalidCiphertextException"),
        ("CreateGrant", "DryRunOperationException"),
    ]
    assert all(r["topic"].endswith("ApiCall.Failed") for r in records)


def test_a_dry_run_without_permission_is_access_denied(api_server: Server, kms: Any) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    nobody = api_server.client(api_server.principal("dry-nobody"))
    assert _code(nobody.encrypt, KeyId=key, Plaintext=b"x", DryRun=True) == (
        "AccessDeniedException"
    )
