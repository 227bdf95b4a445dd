"""``keyledger data-key | reencrypt | random | envelope``: data keys and bulk encryption.

Thin commands over ``KeyLedger`` and ``ledger.envelope_file``. Blobs go to files as raw
bytes, or to stdout as base64; ``--json`` prints the AWS response.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer

from cli.common import ctx_of, emit, parse_pairs
from cli.context import CliContext
from ledger.errors import ValidationError

data_key_app = typer.Typer(
    help="GenerateDataKey: data keys for envelope encryption.", no_args_is_help=True
)
envelope_app = typer.Typer(
    help="Envelope-encrypt files of any size with a data key (streaming AES-256-GCM).",
    no_args_is_help=True,
)

ContextOpt = Annotated[
    list[str] | None, typer.Option("--context", help="Encryption context entry key=value.")
]


def _context_or_record(
    cli: CliContext, operation: str, request: dict[str, Any], pairs: list[str] | None, what: str
) -> dict[str, str] | None:
    """Parsed ``k=v`` pairs (None when none are given); a malformed entry is recorded as a
    failed ``operation``, then raised."""
    try:
        parsed = parse_pairs(pairs, what)
    except ValidationError as err:
        cli.ledger.record_rejected(
            operation=operation, caller=cli.caller, request=request, error=err
        )
        raise
    return parsed if pairs else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _read_blob(path: str) -> bytes:
    """A blob from a file (raw bytes) or stdin (base64, else raw bytes)."""
    if path != "-":
        return Path(path).read_bytes()
    data = sys.stdin.buffer.read()
    with contextlib.suppress(binascii.Error, ValueError):
        return base64.b64decode(data.strip(), validate=True)
    return data


def _write_blob(path: str, data: bytes) -> None:
    """Raw bytes to a file, or base64 on stdout for ``-``."""
    if path == "-":
        typer.echo(_b64(data))
    else:
        Path(path).write_bytes(data)


# ---------------------------------------------------------------- data keys, random


@data_key_app.command("generate")
def data_key_generate(
    ctx: typer.Context,
    key: Annotated[str, typer.Option("--key", help="Key id, key ARN or alias.")],
    key_spec: Annotated[str | None, typer.Option("--key-spec", help="AES_128 or AES_256.")] = None,
    number_of_bytes: Annotated[
        int | None, typer.Option("--number-of-bytes", help="1-1024 (instead of --key-spec).")
    ] = None,
    context: ContextOpt = None,
    without_plaintext: Annotated[
        bool,
        typer.Option("--without-plaintext", help="GenerateDataKeyWithoutPlaintext."),
    ] = False,
) -> None:
    """GenerateDataKey: base64 CiphertextBlob on line 1, base64 Plaintext on line 2.

    With neither --key-spec nor --number-of-bytes, AES_256.
    """
    cli = ctx_of(ctx)
    operation = "GenerateDataKeyWithoutPlaintext" if without_plaintext else "GenerateDataKey"
    if key_spec is None and number_of_bytes is None:
        key_spec = "AES_256"
    request: dict[str, Any] = {"keyId": key}
    enc_context = _context_or_record(cli, operation, request, context, "EncryptionContext")
    generate = (
        cli.ledger.generate_data_key_without_plaintext
        if without_plaintext
        else cli.ledger.generate_data_key
    )
    resp = generate(
        caller=cli.caller,
        key_id=key,
        key_spec=key_spec,
        number_of_bytes=number_of_bytes,
        encryption_context=enc_context,
    )
    lines = [_b64(resp["CiphertextBlob"])]
    if not without_plaintext:
        lines.append(_b64(resp["Plaintext"]))
    emit(cli, resp, "\n".join(lines))


@data_key_app.command("generate-pair")
def data_key_generate_pair(
    ctx: typer.Context,
    key: Annotated[str, typer.Option("--key", help="Symmetric key id, key ARN or alias.")],
    key_pair_spec: Annotated[
        str,
        typer.Option("--key-pair-spec", help="RSA_2048/3072/4096, ECC_NIST_P256/P384/P521, ..."),
    ],
    context: ContextOpt = None,
    without_plaintext: Annotated[
        bool,
        typer.Option("--without-plaintext", help="GenerateDataKeyPairWithoutPlaintext."),
    ] = False,
    private_out: Annotated[
        str | None,
        typer.Option(
            "--private-out",
            help="File (mode 0600) for the PKCS#8 DER private key; required in text mode "
            "unless --without-plaintext.",
        ),
    ] = None,
    public_out: Annotated[
        str | None, typer.Option("--public-out", help="File for the DER public key.")
    ] = None,
) -> None:
    """GenerateDataKeyPair: writes the private (and public) key, prints the base64
    PrivateKeyCiphertextBlob."""
    cli = ctx_of(ctx)
    if without_plaintext and private_out is not None:
        raise typer.BadParameter(
            "cannot be used with --without-plaintext.", param_hint="--private-out"
        )
    if not without_plaintext and private_out is None and not cli.json_output:
        raise typer.BadParameter(
            "is required unless --without-plaintext or --json.", param_hint="--private-out"
        )
    operation = (
        "GenerateDataKeyPairWithoutPlaintext" if without_plaintext else "GenerateDataKeyPair"
    )
    request: dict[str, Any] = {"keyId": key, "keyPairSpec": key_pair_spec}
    enc_context = _context_or_record(cli, operation, request, context, "EncryptionContext")
    generate = (
        cli.ledger.generate_data_key_pair_without_plaintext
        if without_plaintext
        else cli.ledger.generate_data_key_pair
    )
    resp = generate(
        caller=cli.caller, key_id=key, key_pair_spec=key_pair_spec, encryption_context=enc_context
    )
    if private_out is not None:
        with _output(private_out) as f:
            f.write(resp["PrivateKeyPlaintext"])
    if public_out is not None:
        Path(public_out).write_bytes(resp["PublicKey"])
    emit(cli, resp, _b64(resp["PrivateKeyCiphertextBlob"]))


def random_bytes(
    ctx: typer.Context,
    number_of_bytes: Annotated[int, typer.Option("--number-of-bytes", help="1-1024.")],
    outfile: Annotated[
        str, typer.Option("--out", help="File for the raw bytes, or - for base64 on stdout.")
    ] = "-",
) -> None:
    """GenerateRandom: bytes from the HSM's random number generator."""
    cli = ctx_of(ctx)
    resp = cli.ledger.generate_random(caller=cli.caller, number_of_bytes=number_of_bytes)
    if cli.json_output:
        emit(cli, resp, "")
    else:
        _write_blob(outfile, resp["Plaintext"])


def reencrypt(
    ctx: typer.Context,
    destination_key: Annotated[
        str, typer.Option("--destination-key", help="Key id, key ARN or alias to encrypt under.")
    ],
    source_key: Annotated[
        str | None, typer.Option("--source-key", help="The blob's key (optional).")
    ] = None,
    source_context: Annotated[
        list[str] | None,
        typer.Option("--source-context", help="The blob's encryption context entry key=value."),
    ] = None,
    destination_context: Annotated[
        list[str] | None,
        typer.Option("--destination-context", help="The new encryption context entry key=value."),
    ] = None,
    infile: Annotated[
        str, typer.Option("--in", help="Ciphertext blob file, or - for base64 on stdin.")
    ] = "-",
    outfile: Annotated[
        str, typer.Option("--out", help="New blob file, or - for base64 on stdout.")
    ] = "-",
) -> None:
    """ReEncrypt a blob under another key or context; the plaintext stays in the HSM."""
    cli = ctx_of(ctx)
    request: dict[str, Any] = {"destinationKeyId": destination_key}
    if source_key is not None:
        request["sourceKeyId"] = source_key
    src_ctx = _context_or_record(
        cli, "ReEncrypt", request, source_context, "SourceEncryptionContext"
    )
    dst_ctx = _context_or_record(
        cli, "ReEncrypt", request, destination_context, "DestinationEncryptionContext"
    )
    resp = cli.ledger.re_encrypt(
        caller=cli.caller,
        ciphertext_blob=_read_blob(infile),
        destination_key_id=destination_key,
        source_key_id=source_key,
        source_encryption_context=src_ctx,
        destination_encryption_context=dst_ctx,
    )
    if cli.json_output:
        emit(cli, resp, "")
    else:
        _write_blob(outfile, resp["CiphertextBlob"])


# ---------------------------------------------------------------- envelope files


@contextlib.contextmanager
def _input(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
    else:
        with Path(path).open("rb") as f:
            yield f


@contextlib.contextmanager
def _output(path: str) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` only when the block succeeds.

    A regular file is written under a temporary name in the same directory (mode 0600)
    and renamed over ``path`` at the end; on any failure it is deleted, so neither a
    partial output nor a verified-but-incomplete plaintext prefix is left behind, and
    an existing ``path`` is kept. A non-regular ``path`` (a FIFO, /dev/null) is written
    directly.
    """
    if path == "-":
        raise ValidationError("--out must name a file: partial output cannot be taken back.")
    target = Path(path)
    if target.exists() and not target.is_file():
        with target.open("wb") as f:
            yield f
        return
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _stats_line(verb: str, stats: Any, path: str) -> str:
    return (
        f"{verb} {stats['BytesIn']} bytes -> {path} ({stats['BytesOut']} bytes, "
        f"{stats['Chunks']} chunks) under {stats['KeyId']}"
    )


@envelope_app.command("encrypt")
def envelope_encrypt(
    ctx: typer.Context,
    key: Annotated[str, typer.Option("--key", help="Key id, key ARN or alias.")],
    infile: Annotated[str, typer.Option("--in", help="Plaintext file, or - for stdin.")],
    outfile: Annotated[str, typer.Option("--out", help="Envelope file to write.")],
    context: ContextOpt = None,
) -> None:
    """Encrypt a file of any size: one GenerateDataKey, then AES-256-GCM on this host."""
    from ledger.envelope_file import encrypt_file

    cli = ctx_of(ctx)
    enc_context = _context_or_record(
        cli, "GenerateDataKey", {"keyId": key}, context, "EncryptionContext"
    )
    with _input(infile) as src, _output(outfile) as dst:
        stats = encrypt_file(
            cli.ledger,
            caller=cli.caller,
            key_id=key,
            src=src,
            dst=dst,
            encryption_context=enc_context,
        )
    emit(cli, dict(stats), _stats_line("encrypted", stats, outfile))


@envelope_app.command("decrypt")
def envelope_decrypt(
    ctx: typer.Context,
    infile: Annotated[str, typer.Option("--in", help="Envelope file, or - for stdin.")],
    outfile: Annotated[str, typer.Option("--out", help="Plaintext file to write.")],
    context: ContextOpt = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Expected key id or ARN (optional).")
    ] = None,
) -> None:
    """Decrypt an envelope file; --context, when given, must equal the file's.

    Nothing is left at --out unless the whole file authenticates.
    """
    from ledger.envelope_file import decrypt_file

    cli = ctx_of(ctx)
    request: dict[str, Any] = {} if key is None else {"keyId": key}
    enc_context = _context_or_record(cli, "Decrypt", request, context, "EncryptionContext")
    with _input(infile) as src, _output(outfile) as dst:
        stats = decrypt_file(
            cli.ledger,
            caller=cli.caller,
            src=src,
            dst=dst,
            encryption_context=enc_context,
            key_id=key,
        )
    emit(cli, dict(stats), _stats_line("decrypted", stats, outfile))


__all__ = ["data_key_app", "envelope_app", "random_bytes", "reencrypt"]
