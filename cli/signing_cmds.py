"""``keyledger sign | verify | mac generate | mac verify`` and ``keys public-key``.

Messages come from a file or stdin; signatures and MACs go to a file as raw bytes, or
to stdout as base64; ``--json`` prints the AWS response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import ctx_of, emit
from cli.crypto_cmds import _b64, _output, _read_blob, _write_blob
from ledger.errors import ValidationError

mac_app = typer.Typer(help="GenerateMac and VerifyMac with HMAC keys.", no_args_is_help=True)

KeyOpt = Annotated[str, typer.Option("--key", help="Key id, key ARN or alias.")]
MessageIn = Annotated[str, typer.Option("--in", help="Message file, or - for stdin.")]
MessageTypeOpt = Annotated[str, typer.Option("--message-type", help="RAW or DIGEST.")]


def _message(path: str) -> bytes:
    import sys

    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def sign(
    ctx: typer.Context,
    key: KeyOpt,
    algorithm: Annotated[str, typer.Option("--algorithm", help="AWS SigningAlgorithm.")],
    infile: MessageIn = "-",
    message_type: MessageTypeOpt = "RAW",
    outfile: Annotated[str, typer.Option("--out", help="Signature file, or - (base64).")] = "-",
) -> None:
    """Sign a message (or a digest) with an asymmetric SIGN_VERIFY key."""
    cli = ctx_of(ctx)
    resp = cli.ledger.sign(
        caller=cli.caller, key_id=key, message=_message(infile),
        signing_algorithm=algorithm, message_type=message_type,
    )  # fmt: skip
    if cli.json_output:
        emit(cli, resp, "")
    else:
        _write_blob(outfile, resp["Signature"])


def verify(
    ctx: typer.Context,
    key: KeyOpt,
    algorithm: Annotated[str, typer.Option("--algorithm", help="AWS SigningAlgorithm.")],
    signature: Annotated[str, typer.Option("--signature", help="Signature file, or - (base64).")],
    infile: MessageIn = "-",
    message_type: MessageTypeOpt = "RAW",
) -> None:
    """Verify a signature; exit 1 with KMSInvalidSignatureException when it is not valid."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.verify(
        caller=cli.caller, key_id=key, message=_message(infile), signature=_read_blob(signature),
        signing_algorithm=algorithm, message_type=message_type,
    )  # fmt: skip
    emit(cli, resp, "signature valid")


@mac_app.command("generate")
def mac_generate(
    ctx: typer.Context,
    key: KeyOpt,
    algorithm: Annotated[str, typer.Option("--algorithm", help="HMAC_SHA_224/256/384/512.")],
    infile: MessageIn = "-",
    outfile: Annotated[str, typer.Option("--out", help="MAC file, or - (base64).")] = "-",
) -> None:
    """GenerateMac with an HMAC key."""
    cli = ctx_of(ctx)
    resp = cli.ledger.generate_mac(
        caller=cli.caller, key_id=key, message=_message(infile), mac_algorithm=algorithm
    )
    if cli.json_output:
        emit(cli, resp, "")
    else:
        _write_blob(outfile, resp["Mac"])


@mac_app.command("verify")
def mac_verify(
    ctx: typer.Context,
    key: KeyOpt,
    algorithm: Annotated[str, typer.Option("--algorithm", help="HMAC_SHA_224/256/384/512.")],
    mac: Annotated[str, typer.Option("--mac", help="MAC file, or - (base64).")],
    infile: MessageIn = "-",
) -> None:
    """VerifyMac; exit 1 with KMSInvalidMacException when the MAC does not match."""
    cli = ctx_of(ctx)
    resp = cli.ledger.verify_mac(
        caller=cli.caller, key_id=key, message=_message(infile), mac_algorithm=algorithm,
        mac=_read_blob(mac),
    )  # fmt: skip
    emit(cli, resp, "MAC valid")


def public_key(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key id, key ARN or alias.")],
    outfile: Annotated[str, typer.Option("--out", help="DER file, or - for PEM.")] = "-",
) -> None:
    """GetPublicKey: the DER SubjectPublicKeyInfo (PEM on stdout)."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.get_public_key(caller=cli.caller, key_id=key)
    if cli.json_output:
        emit(cli, resp, "")
    elif outfile == "-":
        body = _b64(resp["PublicKey"])
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        typer.echo("-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----")
    else:
        Path(outfile).write_bytes(resp["PublicKey"])


def _peer_public_key(path: str) -> bytes:
    """A DER SubjectPublicKeyInfo from a DER or PEM file (the service checks the DER)."""
    data = Path(path).read_bytes()
    if not data.lstrip().startswith(b"-----BEGIN"):
        return data
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_public_key,
    )

    try:
        peer = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ValidationError(f"{path} is not a PEM public key.") from None
    return peer.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def derive_shared_secret(
    ctx: typer.Context,
    key: KeyOpt,
    peer_public_key: Annotated[
        str, typer.Option("--peer-public-key", help="Peer public key file (DER or PEM).")
    ],
    algorithm: Annotated[
        str, typer.Option("--algorithm", help="AWS KeyAgreementAlgorithm.")
    ] = "ECDH",
    outfile: Annotated[
        str, typer.Option("--out", help="Shared secret file (mode 0600), or - (base64).")
    ] = "-",
) -> None:
    """DeriveSharedSecret: ECDH between a KEY_AGREEMENT key and a peer public key."""
    cli = ctx_of(ctx)
    try:
        peer = _peer_public_key(peer_public_key)
    except ValidationError as err:
        cli.ledger_without_hsm.record_rejected(
            operation="DeriveSharedSecret", caller=cli.caller,
            request={"keyId": key, "keyAgreementAlgorithm": algorithm}, error=err,
        )  # fmt: skip
        raise
    resp = cli.ledger.derive_shared_secret(
        caller=cli.caller, key_id=key, key_agreement_algorithm=algorithm, public_key=peer
    )
    if cli.json_output:
        emit(cli, resp, "")
    elif outfile == "-":
        typer.echo(_b64(resp["SharedSecret"]))
    else:
        with _output(outfile) as f:
            f.write(resp["SharedSecret"])
