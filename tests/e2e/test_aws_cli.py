"""The AWS CLI (v1, unmodified, ``--endpoint-url``) against a real ``keyledger serve``:
keys, encrypt/decrypt, data keys, sign/verify and STS GetCallerIdentity, signed with a
principal made through ``keyledger principals create``. No user AWS config leaks in."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import Server, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm]

AWS = Path(sys.executable).parent / "aws"
ACCOUNT = "111122223333"


@dataclass
class Aws:
    server: Server
    env: dict[str, str]
    principal_arn: str

    def run(self, *args: str, fails: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``aws``; assert exit 0, or with ``fails`` a non-zero exit (CLI v1 exits
        255 on a service error, v2 254) and no output on stdout."""
        proc = subprocess.run(
            [str(AWS), "--endpoint-url", self.server.url, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        failed = proc.returncode != 0
        assert failed == fails, (args, proc.returncode, proc.stdout, proc.stderr)
        assert not fails or proc.stdout == "", proc.stdout
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--output", "json").stdout)

    def text(self, *args: str, query: str) -> str:
        return self.run(*args, "--output", "text", "--query", query).stdout.strip()


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Aws]:
    if not AWS.exists():
        pytest.skip(f"AWS CLI not installed at {AWS}")
    tmp = tmp_path_factory.mktemp("aws-cli")
    server = start_server(tmp / "data", log_path=tmp / "serve.log")
    try:
        creds = server.principal(
            "cli-user",
            policy={
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
            },
        )
        (tmp / "config").write_text("")
        (tmp / "credentials").write_text("")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("AWS_") and k not in ("KEYLEDGER_DATABASE_URL",)
        }
        env.update(
            AWS_ACCESS_KEY_ID=creds["AccessKeyId"],
            AWS_SECRET_ACCESS_KEY=creds["SecretAccessKey"],
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=str(tmp / "config"),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp / "credentials"),
            AWS_EC2_METADATA_DISABLED="true",
            AWS_PAGER="",
        )
        yield Aws(server=server, env=env, principal_arn=_arn_of(creds))
    finally:
        stop_server(server)


def _arn_of(creds: dict[str, Any]) -> str:
    principal = creds["Principal"]
    arn: str = principal["Arn"] if isinstance(principal, dict) else principal
    return arn


@pytest.fixture(scope="module")
def key_id(aws: Aws) -> str:
    md = aws.json("kms", "create-key", "--description", "aws cli e2e")["KeyMetadata"]
    assert md["KeySpec"] == "SYMMETRIC_DEFAULT" and md["KeyState"] == "Enabled"
    assert md["Arn"] == f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{md['KeyId']}"
    key: str = md["KeyId"]
    return key


def test_sts_get_caller_identity_names_the_principal(aws: Aws) -> None:
    out = aws.json("sts", "get-caller-identity")
    assert out["Account"] == ACCOUNT
    assert out["Arn"] == aws.principal_arn == f"arn:aws:iam::{ACCOUNT}:user/cli-user"
    assert out["UserId"]


def test_encrypt_then_decrypt_with_context_through_files(
    aws: Aws, key_id: str, tmp_path: Path
) -> None:
    secret = os.urandom(200)
    (tmp_path / "plain.bin").write_bytes(secret)
    blob_b64 = aws.text(
        "kms", "encrypt", "--key-id", key_id, "--plaintext", f"fileb://{tmp_path / 'plain.bin'}",
        "--encryption-context", "app=cli,stage=e2e", query="CiphertextBlob",
    )  # fmt: skip
    (tmp_path / "blob.bin").write_bytes(base64.b64decode(blob_b64))
    out = aws.json(
        "kms", "decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'blob.bin'}",
        "--encryption-context", "app=cli,stage=e2e",
    )  # fmt: skip
    assert base64.b64decode(out["Plaintext"]) == secret
    assert out["KeyId"].endswith(key_id) and out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    bad = aws.run(
        "kms", "decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'blob.bin'}",
        "--encryption-context", "app=cli,stage=other", fails=True,
    )  # fmt: skip
    assert "InvalidCiphertextException" in bad.stderr


def test_generate_data_key_aes_256_decrypts_to_its_plaintext(
    aws: Aws, key_id: str, tmp_path: Path
) -> None:
    out = aws.json("kms", "generate-data-key", "--key-id", key_id, "--key-spec", "AES_256")
    plain = base64.b64decode(out["Plaintext"])
    assert len(plain) == 32 and out["KeyId"].endswith(key_id)
    (tmp_path / "dk.bin").write_bytes(base64.b64decode(out["CiphertextBlob"]))
    back = aws.text(
        "kms", "decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'dk.bin'}", query="Plaintext"
    )
    assert base64.b64decode(back) == plain


def test_sign_then_verify_and_another_message_fails(aws: Aws, tmp_path: Path) -> None:
    md = aws.json("kms", "create-key", "--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY")[
        "KeyMetadata"
    ]
    assert md["SigningAlgorithms"] == ["ECDSA_SHA_256"]
    (tmp_path / "msg").write_bytes(b"approve payment 42")
    (tmp_path / "other").write_bytes(b"approve payment 43")
    common = ["--key-id", md["KeyId"], "--message-type", "RAW",
              "--signing-algorithm", "ECDSA_SHA_256"]  # fmt: skip
    sig = aws.text("kms", "sign", *common, "--message", f"fileb://{tmp_path / 'msg'}",
                   query="Signature")  # fmt: skip
    (tmp_path / "sig").write_bytes(base64.b64decode(sig))
    ok = aws.json(
        "kms", "verify", *common, "--message", f"fileb://{tmp_path / 'msg'}",
        "--signature", f"fileb://{tmp_path / 'sig'}",
    )  # fmt: skip
    assert ok["SignatureValid"] is True and ok["KeyId"] == md["Arn"]
    bad = aws.run(
        "kms", "verify", *common, "--message", f"fileb://{tmp_path / 'other'}",
        "--signature", f"fileb://{tmp_path / 'sig'}", fails=True,
    )  # fmt: skip
    assert "KMSInvalidSignatureException" in bad.stderr


def test_unknown_key_is_a_not_found_error_with_a_nonzero_exit(aws: Aws) -> None:
    bad = aws.run("kms", "describe-key", "--key-id", "alias/does-not-exist", fails=True)
    assert "NotFoundException" in bad.stderr
