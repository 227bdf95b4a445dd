"""Data keys, random bytes, ReEncrypt and envelope files through the real `keyledger`
command: real processes, SoftHSM2, SQLite."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from tests.e2e.test_cli import Cli

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm]

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(tmp_path_factory.mktemp("crypto") / "data")


@pytest.fixture(scope="module")
def key(cli: Cli) -> str:
    return cli("keys", "create", "--description", "crypto e2e").stdout.decode().strip()


def lines_of(out: bytes) -> list[str]:
    return out.decode().strip().splitlines()


@pytest.mark.parametrize(
    ("args", "size"),
    [(["--key-spec", "AES_128"], 16), (["--key-spec", "AES_256"], 32), ([], 32)],
)
def test_data_key_generate_prints_the_blob_then_the_plaintext_key(
    cli: Cli, key: str, args: list[str], size: int
) -> None:
    blob_b64, plain_b64 = lines_of(cli("data-key", "generate", "--key", key, *args).stdout)
    assert len(base64.b64decode(plain_b64)) == size
    blob = base64.b64decode(blob_b64)
    back = cli("decrypt", "--key", key, stdin=blob_b64.encode()).stdout
    assert back == base64.b64decode(plain_b64) and len(blob) > size


def test_data_key_generate_with_number_of_bytes_context_and_json(cli: Cli, key: str) -> None:
    resp = json.loads(
        cli(
            "--json", "data-key", "generate", "--key", key, "--number-of-bytes", "100",
            "--context", "app=e2e",
        ).stdout
    )  # fmt: skip
    assert set(resp) == {"CiphertextBlob", "Plaintext", "KeyId", "KeyMaterialId"}
    assert len(base64.b64decode(resp["Plaintext"])) == 100 and resp["KeyId"].endswith(key)
    plain = cli("decrypt", "--context", "app=e2e", stdin=resp["CiphertextBlob"].encode()).stdout
    assert plain == base64.b64decode(resp["Plaintext"])


def test_data_key_without_plaintext_prints_only_the_blob(cli: Cli, key: str) -> None:
    out = lines_of(cli("data-key", "generate", "--key", key, "--without-plaintext").stdout)
    assert len(out) == 1 and len(base64.b64decode(out[0])) > 32


def test_random_prints_base64_or_writes_raw_bytes(cli: Cli, tmp_path: Path) -> None:
    assert len(base64.b64decode(cli("random", "--number-of-bytes", "24").stdout.strip())) == 24
    cli("random", "--number-of-bytes", "1024", "--out", str(tmp_path / "r.bin"))
    assert len((tmp_path / "r.bin").read_bytes()) == 1024
    proc = cli("random", "--number-of-bytes", "1025", expect=1)
    assert proc.stderr.decode().startswith("error: ValidationException")


def test_reencrypt_moves_a_blob_to_another_key_and_context(
    cli: Cli, key: str, tmp_path: Path
) -> None:
    other = cli("keys", "create").stdout.decode().strip()
    (tmp_path / "p").write_bytes(b"secret payload")
    cli("encrypt", "--key", key, "--context", "a=1", "--in", str(tmp_path / "p"),
        "--out", str(tmp_path / "blob"))  # fmt: skip
    moved = cli(
        "reencrypt", "--in", str(tmp_path / "blob"), "--destination-key", other,
        "--source-context", "a=1", "--destination-context", "b=2",
    ).stdout  # fmt: skip
    assert cli("decrypt", "--key", other, "--context", "b=2", stdin=moved).stdout == (
        b"secret payload"
    )
    failed = cli("decrypt", "--context", "a=1", stdin=moved, expect=1)
    assert failed.stderr.decode().startswith("error: InvalidCiphertextException")


def test_envelope_round_trip_of_a_5_mib_file(cli: Cli, key: str, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 123)
    (tmp_path / "big").write_bytes(data)
    enc, dec = tmp_path / "big.klx", tmp_path / "big.out"
    out = cli("envelope", "encrypt", "--key", key, "--in", str(tmp_path / "big"),
              "--out", str(enc), "--context", "file=big").stdout  # fmt: skip
    assert out.startswith(b"encrypted 5243003 bytes")
    assert enc.read_bytes()[:4] == b"KLX1" and data not in enc.read_bytes()
    cli("envelope", "decrypt", "--in", str(enc), "--out", str(dec))
    assert dec.read_bytes() == data
    cli("envelope", "decrypt", "--in", str(enc), "--out", str(dec), "--context", "file=big")
    assert dec.read_bytes() == data


def test_a_tampered_envelope_file_exits_1_and_leaves_no_output(
    cli: Cli, key: str, tmp_path: Path
) -> None:
    (tmp_path / "plain").write_bytes(os.urandom(300_000))
    enc = tmp_path / "plain.klx"
    cli("envelope", "encrypt", "--key", key, "--in", str(tmp_path / "plain"), "--out", str(enc))
    blob = bytearray(enc.read_bytes())
    blob[len(blob) - 1000] ^= 0x01  # in the last chunk: earlier chunks verify first
    (tmp_path / "bad.klx").write_bytes(bytes(blob))
    out = tmp_path / "out"
    proc = cli("envelope", "decrypt", "--in", str(tmp_path / "bad.klx"), "--out", str(out),
               expect=1)  # fmt: skip
    assert proc.stdout == b""
    assert lines_of(proc.stderr) == ["error: InvalidCiphertextException:"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.klx", "plain", "plain.klx"]
    proc = cli("envelope", "decrypt", "--in", str(enc), "--out", str(out), "--context", "x=y",
               expect=1)  # fmt: skip
    assert lines_of(proc.stderr) == ["error: InvalidCiphertextException:"]
    assert not out.exists()
