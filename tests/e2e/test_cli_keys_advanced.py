"""RSA encryption, data key pairs, ECDH and imported key material (BYOK) through the
real `keyledger` command: real processes, SoftHSM2, SQLite."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tests.e2e.test_cli import Cli

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm]


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(tmp_path_factory.mktemp("keys_advanced") / "data")


def create(cli: Cli, *args: str) -> str:
    resp = json.loads(cli("--json", "keys", "create", *args).stdout)
    return str(resp["KeyMetadata"]["KeyId"])


def test_rsa_encrypt_decrypt_round_trip_with_oaep_sha_256(cli: Cli, tmp_path: Path) -> None:
    key = create(cli, "--key-spec", "RSA_2048", "--key-usage", "ENCRYPT_DECRYPT")
    plain = tmp_path / "plain"
    plain.write_bytes(b"rsa secret \x00\xff")
    blob = tmp_path / "blob"
    cli("encrypt", "--key", key, "--algorithm", "RSAES_OAEP_SHA_256",
        "--in", str(plain), "--out", str(blob))  # fmt: skip
    assert blob.stat().st_size == 256
    back = cli("decrypt", "--key", key, "--algorithm", "RSAES_OAEP_SHA_256",
               "--in", str(blob)).stdout  # fmt: skip
    assert back == plain.read_bytes()
    # The wrong algorithm does not decrypt.
    wrong = cli("decrypt", "--key", key, "--algorithm", "RSAES_OAEP_SHA_1", "--in", str(blob),
                expect=1)  # fmt: skip
    assert wrong.stderr.startswith(b"error: ")


def test_generate_pair_private_key_blob_decrypts_to_the_written_private_key(
    cli: Cli, tmp_path: Path
) -> None:
    key = create(cli)
    private, public = tmp_path / "priv.der", tmp_path / "pub.der"
    out = cli("data-key", "generate-pair", "--key", key, "--key-pair-spec", "ECC_NIST_P256",
              "--context", "app=e2e", "--private-out", str(private),
              "--public-out", str(public)).stdout  # fmt: skip
    assert private.stat().st_mode & 0o777 == 0o600
    blob_b64 = out.decode().strip()
    back = cli("decrypt", "--key", key, "--context", "app=e2e", stdin=blob_b64.encode()).stdout
    assert back == private.read_bytes()
    priv = serialization.load_der_private_key(back, password=None)
    assert (
        priv.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == public.read_bytes()
    )
    # Without plaintext: JSON has no PrivateKeyPlaintext; text mode needs --private-out.
    resp = json.loads(cli("--json", "data-key", "generate-pair", "--key", key,
                          "--key-pair-spec", "RSA_2048", "--without-plaintext").stdout)  # fmt: skip
    assert "PrivateKeyPlaintext" not in resp and resp["KeyPairSpec"] == "RSA_2048"
    cli("data-key", "generate-pair", "--key", key, "--key-pair-spec", "RSA_2048", expect=2)


def test_derive_shared_secret_equals_cryptography_ecdh(cli: Cli, tmp_path: Path) -> None:
    key = create(cli, "--key-spec", "ECC_NIST_P256", "--key-usage", "KEY_AGREEMENT")
    ours = serialization.load_der_public_key(
        json_blob(cli("--json", "keys", "public-key", key).stdout, "PublicKey")
    )
    assert isinstance(ours, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(ec.SECP256R1())
    expected = peer.exchange(ec.ECDH(), ours)
    pem = tmp_path / "peer.pem"
    pem.write_bytes(
        peer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    out = cli("derive-shared-secret", "--key", key, "--peer-public-key", str(pem)).stdout
    assert base64.b64decode(out.strip()) == expected
    der, secret = tmp_path / "peer.der", tmp_path / "secret"
    der.write_bytes(
        peer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    cli("derive-shared-secret", "--key", key, "--peer-public-key", str(der),
        "--algorithm", "ECDH", "--out", str(secret))  # fmt: skip
    assert secret.read_bytes() == expected


def json_blob(out: bytes, field: str) -> bytes:
    return base64.b64decode(json.loads(out)[field])


def describe_state(cli: Cli, key: str) -> str:
    return str(json.loads(cli("--json", "keys", "describe", key).stdout)["KeyMetadata"]["KeyState"])


def test_byok_import_use_and_delete_imported_material(cli: Cli, tmp_path: Path) -> None:
    key = create(cli, "--origin", "EXTERNAL")
    assert describe_state(cli, key) == "PendingImport"
    wrapping, token = tmp_path / "wrapping.der", tmp_path / "token"
    valid_to = cli("keys", "import-params", key, "--wrapping-algorithm", "RSAES_OAEP_SHA_256",
                   "--wrapping-key-spec", "RSA_2048", "--public-key-out", str(wrapping),
                   "--token-out", str(token)).stdout.decode().strip()  # fmt: skip
    assert valid_to.endswith("Z") and token.stat().st_size > 0
    public = serialization.load_der_public_key(wrapping.read_bytes())
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    material = tmp_path / "material.enc"
    oaep = padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
    )
    material.write_bytes(public.encrypt(os.urandom(32), oaep))
    cli("keys", "import", key, "--token", str(token), "--material", str(material))
    assert describe_state(cli, key) == "Enabled"

    blob = cli("encrypt", "--key", key, stdin=b"byok plaintext").stdout
    assert cli("decrypt", stdin=blob).stdout == b"byok plaintext"

    cli("keys", "delete-imported", key)
    assert describe_state(cli, key) == "PendingImport"
    failed = cli("encrypt", "--key", key, stdin=b"byok plaintext", expect=1)
    assert failed.stderr.startswith(b"error: KMSInvalidStateException")
