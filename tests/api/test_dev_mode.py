"""``keyledger serve --dev``: moto/LocalStack-style credentials (any key, any secret; a
12-digit access key id is that account), ``POST /moto-api/reset`` that archives the
SQLite ledger rather than deleting it, and loopback only."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.api.conftest import (
    LedgerView,
    Server,
    free_port,
    keyledger_bin,
    start_server,
    stop_server,
)

DEFAULT_ACCOUNT = "000000000000"
OTHER_ACCOUNT = "123456789012"


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("dev")
    srv = start_server(root / "data", "--dev", log_path=root / "server.log")
    try:
        yield srv
    finally:
        stop_server(srv)


def _client(srv: Server, access_key: str, secret: str) -> Any:
    return srv.client(access_key=access_key, secret=secret)


def test_any_access_key_with_any_secret_acts_as_an_account_root(dev: Server) -> None:
    default = _client(dev, "AKIDANYTHING", "any secret at all")
    key = default.create_key(Description="default account")["KeyMetadata"]
    assert key["Arn"].startswith(f"arn:aws:kms:us-east-1:{DEFAULT_ACCOUNT}:key/")
    same = _client(dev, "SOMEOTHERKEY", "another secret")  # another key, same default account
    assert same.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["Arn"] == key["Arn"]

    other = _client(dev, OTHER_ACCOUNT, "x")
    theirs = other.create_key(Description="other account")["KeyMetadata"]
    assert theirs["Arn"].startswith(f"arn:aws:kms:us-east-1:{OTHER_ACCOUNT}:key/")
    sts = dev.client(service="sts", access_key=OTHER_ACCOUNT, secret="y")
    assert sts.get_caller_identity()["Account"] == OTHER_ACCOUNT


def test_keys_of_one_account_are_invisible_to_another(dev: Server) -> None:
    mine, theirs = _client(dev, "AKIDMINE", "s"), _client(dev, OTHER_ACCOUNT, "s")
    my_key = mine.create_key()["KeyMetadata"]
    their_key = theirs.create_key()["KeyMetadata"]
    my_ids = {k["KeyId"] for k in mine.list_keys()["Keys"]}
    their_ids = {k["KeyId"] for k in theirs.list_keys()["Keys"]}
    assert my_key["KeyId"] in my_ids and my_key["KeyId"] not in their_ids
    assert their_key["KeyId"] in their_ids and their_key["KeyId"] not in my_ids
    for client, key in ((theirs, my_key), (mine, their_key)):
        with pytest.raises(ClientError) as err:
            client.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
        assert err.value.response["Error"]["Code"] == "NotFoundException"


def test_aliases_are_per_account_and_listed_by_key_arn(dev: Server) -> None:
    mine, theirs = _client(dev, "AKIDALIAS", "s"), _client(dev, OTHER_ACCOUNT, "s")
    my_key = mine.create_key()["KeyMetadata"]
    their_key = theirs.create_key()["KeyMetadata"]
    mine.create_alias(AliasName="alias/same-name", TargetKeyId=my_key["KeyId"])
    theirs.create_alias(AliasName="alias/same-name", TargetKeyId=their_key["KeyId"])
    listed = mine.list_aliases(KeyId=my_key["Arn"])["Aliases"]
    assert [a["AliasArn"] for a in listed] == [
        f"arn:aws:kms:us-east-1:{DEFAULT_ACCOUNT}:alias/same-name"
    ]
    assert mine.describe_key(KeyId="alias/same-name")["KeyMetadata"]["Arn"] == my_key["Arn"]
    assert theirs.describe_key(KeyId="alias/same-name")["KeyMetadata"]["Arn"] == their_key["Arn"]


def test_reset_empties_the_ledger_and_archives_the_old_database(
    dev: Server, tmp_path: Path
) -> None:
    kms = _client(dev, "AKIDRESET", "s")
    kms.create_key(Description="before reset")
    assert kms.list_keys()["Keys"] != []
    old_head = LedgerView(dev.data_dir).head()
    assert old_head > 0

    response = httpx.post(dev.url + "/moto-api/reset", timeout=30)
    assert response.status_code == 200, response.text

    for client in (kms, _client(dev, OTHER_ACCOUNT, "s")):
        assert client.list_keys()["Keys"] == []
    archived = sorted(dev.data_dir.glob("ledger.sqlite3.archived-*"))
    databases = [p for p in archived if not p.name.endswith(("-wal", "-shm"))]
    assert len(databases) == 1 and databases[0].stat().st_size > 0
    # The archive is a complete ledger: copied into a data dir of its own, it verifies
    # with every record it had.
    copy = tmp_path / "archive"
    copy.mkdir()
    for path in archived:
        shutil.copy(path, copy / path.name.replace(databases[0].name, "ledger.sqlite3"))
    assert LedgerView(copy).head() == old_head
    verify = subprocess.run(
        [keyledger_bin(), "--data-dir", str(copy), "audit", "verify"],
        capture_output=True, env=dev.env, timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.decode().startswith(f"OK: {old_head} events")
    # The fresh ledger works.
    key = kms.create_key(Description="after reset")["KeyMetadata"]
    assert [k["KeyId"] for k in kms.list_keys()["Keys"]] == [key["KeyId"]]


def test_dev_mode_refuses_to_bind_a_non_loopback_address(tmp_path: Path) -> None:
    proc = subprocess.run(
        [keyledger_bin(), "--data-dir", str(tmp_path / "data"), "serve", "--dev",
         "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    message = (proc.stdout + proc.stderr).decode()
    assert "loopback" in message and "0.0.0.0" in message
    assert "listening" not in message


def test_reset_is_not_found_without_dev_mode(api_server: Server) -> None:
    response = httpx.post(api_server.url + "/moto-api/reset", timeout=30)
    assert response.status_code == 404
    assert httpx.get(api_server.url + "/health", timeout=30).status_code == 200
