"""The ``keyledger`` command line: thin commands over the library.

Errors become one line ``error: <AWSName>: <message>`` on stderr and exit code 1 at a
single boundary (``main``); usage errors exit 2. No traceback reaches the user.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from cli.aliases import aliases_app
from cli.audit_cmds import register as register_audit
from cli.common import ctx_of as _ctx
from cli.common import emit as _emit
from cli.common import jsonable as _jsonable
from cli.common import parse_pairs, stop_on_signals
from cli.consume import consume_app
from cli.context import CliContext
from cli.crypto_cmds import data_key_app, envelope_app, random_bytes, reencrypt
from cli.forensics import register as register_forensics
from cli.grants import grants_app
from cli.keys import keys_app
from cli.maintenance import maintenance_app
from cli.principals import principals_app
from cli.serve import serve
from cli.signing_cmds import derive_shared_secret, mac_app, public_key, sign, verify
from ledger.errors import KeyLedgerError, ValidationError
from ledger.settings import Settings

app = typer.Typer(
    name="keyledger",
    help="KeyLedger: an AWS-KMS-compatible key ledger with an audit stream.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
audit_app = typer.Typer(help="Verify the ledger and read the audit trail.", no_args_is_help=True)
projections_app = typer.Typer(help="Maintain read models.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(aliases_app, name="aliases")
app.add_typer(grants_app, name="grants")
app.add_typer(maintenance_app, name="maintenance")
app.add_typer(audit_app, name="audit")
register_audit(audit_app)
register_forensics(audit_app, projections_app)
app.add_typer(projections_app, name="projections")
app.add_typer(consume_app, name="consume")
app.add_typer(data_key_app, name="data-key")
app.add_typer(envelope_app, name="envelope")
app.add_typer(mac_app, name="mac")
app.command("sign")(sign)
app.command("verify")(verify)
app.command("derive-shared-secret")(derive_shared_secret)
keys_app.command("public-key")(public_key)
app.command("reencrypt")(reencrypt)
app.command("random")(random_bytes)
app.add_typer(principals_app, name="principals")
app.command("serve")(serve)


__all__ = ["_jsonable", "app", "main", "parse_context", "trail_line"]


@app.callback()
def root(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None,
        typer.Option(envvar="KEYLEDGER_DATA_DIR", help="Data dir (SQLite ledger, SoftHSM token)."),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(envvar="KEYLEDGER_DATABASE_URL", help="postgresql://... instead of SQLite."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print AWS-shaped JSON responses.")
    ] = False,
    as_principal: Annotated[
        str | None,
        typer.Option(
            "--as",
            envvar="KEYLEDGER_AS",
            help="Act as this principal (name in the account); the account root by default.",
        ),
    ] = None,
) -> None:
    settings = Settings.from_env(data_dir=data_dir, database_url=database_url)
    cli = CliContext(settings=settings, json_output=json_output, as_principal=as_principal)
    ctx.obj = cli
    ctx.call_on_close(cli.close)


# ---------------------------------------------------------------- crypto


def parse_context(pairs: list[str] | None) -> dict[str, str]:
    """``k=v`` pairs to an encryption context; raises ValidationError when malformed."""
    return parse_pairs(pairs, "EncryptionContext")


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    return Path(path).read_bytes()


def _write_output(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        Path(path).write_bytes(data)


ContextOpt = Annotated[
    list[str] | None, typer.Option("--context", help="Encryption context entry key=value.")
]
AlgorithmOpt = Annotated[
    str,
    typer.Option(
        "--algorithm",
        help="AWS EncryptionAlgorithm: SYMMETRIC_DEFAULT, or RSAES_OAEP_SHA_1/256 for RSA keys.",
    ),
]


@app.command("encrypt")
def encrypt(
    ctx: typer.Context,
    key: Annotated[str, typer.Option("--key", help="Key id or ARN.")],
    context: ContextOpt = None,
    infile: Annotated[str, typer.Option("--in", help="Plaintext file, or - for stdin.")] = "-",
    outfile: Annotated[
        str, typer.Option("--out", help="Ciphertext blob file, or - for base64 on stdout.")
    ] = "-",
    algorithm: AlgorithmOpt = "SYMMETRIC_DEFAULT",
) -> None:
    """Encrypt up to 4096 bytes; the blob binds the encryption context."""
    cli = _ctx(ctx)
    try:
        enc_context = parse_context(context)
    except ValidationError as err:
        cli.ledger.record_rejected(
            operation="Encrypt", caller=cli.caller, request={"keyId": key}, error=err
        )
        raise
    plaintext = _read_input(infile)
    resp = cli.ledger.encrypt(
        caller=cli.caller,
        key_id=key,
        plaintext=plaintext,
        encryption_context=enc_context,
        encryption_algorithm=algorithm,
    )
    if cli.json_output:
        _emit(cli, resp, "")
    elif outfile == "-":
        typer.echo(base64.b64encode(resp["CiphertextBlob"]).decode("ascii"))
    else:
        _write_output(outfile, resp["CiphertextBlob"])


@app.command("decrypt")
def decrypt(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Option("--key", help="Key id or ARN (optional).")] = None,
    context: ContextOpt = None,
    infile: Annotated[
        str, typer.Option("--in", help="Ciphertext blob file, or - for base64 on stdin.")
    ] = "-",
    outfile: Annotated[str, typer.Option("--out", help="Plaintext file, or - for stdout.")] = "-",
    algorithm: AlgorithmOpt = "SYMMETRIC_DEFAULT",
) -> None:
    """Decrypt a blob made by encrypt, with the same encryption context.

    RSA blobs need --key and the --algorithm they were encrypted with.
    """
    cli = _ctx(ctx)
    request: dict[str, Any] = {} if key is None else {"keyId": key}
    try:
        enc_context = parse_context(context)
    except ValidationError as err:
        cli.ledger.record_rejected(
            operation="Decrypt", caller=cli.caller, request=request, error=err
        )
        raise
    blob = _read_input(infile)
    if infile == "-":
        with contextlib.suppress(binascii.Error, ValueError):  # else raw bytes on stdin
            blob = base64.b64decode(blob.strip(), validate=True)
    resp = cli.ledger.decrypt(
        caller=cli.caller,
        ciphertext_blob=blob,
        key_id=key,
        encryption_context=enc_context,
        encryption_algorithm=algorithm,
    )
    if cli.json_output:
        _emit(cli, resp, "")
    else:
        _write_output(outfile, resp["Plaintext"])


# ---------------------------------------------------------------- audit


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    expect_head: Annotated[
        str | None, typer.Option(help="Hex head hash a previous verify printed.")
    ] = None,
    expect_count: Annotated[int | None, typer.Option(help="Number of events expected.")] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Verify this export bundle offline (no DB, no HSM).")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option(help="Trusted verifier key file (C2SP vkey lines).")
    ] = None,
    siem_copy: Annotated[
        Path | None, typer.Option(help="With --bundle: SIEM copies (JSON lines) to check.")
    ] = None,
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option(help="With --bundle: a signed checkpoint kept earlier (repeatable)."),
    ] = None,
) -> None:
    """Walk the whole log (chain, key chains, tree, checkpoints); exit 1 naming the first
    bad position. With --bundle: verify an export offline with --public-key."""
    from cli.audit_cmds import verify_bundle_cmd, verify_live

    if bundle is not None:
        verify_bundle_cmd(bundle, public_key, siem_copy, checkpoint or [])
        return
    try:
        head = bytes.fromhex(expect_head) if expect_head else None
    except ValueError:
        raise ValidationError("--expect-head must be a hex SHA-256 hash.") from None
    verify_live(ctx, head, expect_count, public_key)


def trail_line(seq: int, event: dict[str, Any]) -> str:
    call = event.get("call", {})
    outcome = event.get("error_code") or "OK"
    key = event.get("key_arn") or "-"
    ctx = event.get("request", {}).get("encryptionContext")
    ctx_text = f" context={orjson.dumps(ctx).decode()}" if ctx else ""
    return (
        f"{seq:>6}  {event.get('timestamp', '')[:23]}  {call.get('operation', '?'):<20} "
        f"{outcome:<28} {call.get('principal', '?')}  {key}{ctx_text}"
    )


# ---------------------------------------------------------------- stream, projections


stream_app = typer.Typer(
    help="Relay ledger events to Kafka (CloudTrail, or an OCSF/ECS/HEC view), exactly once."
)
app.add_typer(stream_app, name="stream")

_VIEW_HELP = "cloudtrail (keyledger.audit.v1), ocsf, ecs or hec (keyledger.audit.<view>.v1)."
_BootstrapOpt = Annotated[
    str | None,
    typer.Option(envvar="KEYLEDGER_KAFKA_BOOTSTRAP", help="Kafka bootstrap HOST:PORT."),
]
_ViewOpt = Annotated[str, typer.Option(envvar="KEYLEDGER_STREAM_VIEW", help=_VIEW_HELP)]
_TopicOpt = Annotated[
    str | None,
    typer.Option(envvar="KEYLEDGER_STREAM_TOPIC", help="Topic (default: the view's)."),
]


def _check_view(view: str) -> str:
    from consumers.relay import VIEW_TOPICS

    if view not in VIEW_TOPICS:
        raise ValidationError(f"--view must be one of {', '.join(VIEW_TOPICS)}; got {view!r}.")
    return view


@stream_app.callback(invoke_without_command=True)
def stream(
    ctx: typer.Context,
    bootstrap: _BootstrapOpt = None,
    once: Annotated[bool, typer.Option(help="Publish up to the head, then exit.")] = False,
    poll_interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 0.5,
    view: _ViewOpt = "cloudtrail",
    topic: _TopicOpt = None,
    partitions: Annotated[
        int,
        typer.Option(
            envvar="KEYLEDGER_STREAM_PARTITIONS",
            min=1,
            help="Partitions when the relay creates the topic.",
        ),
    ] = 3,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Records per confirmed batch (bounds memory).")
    ] = 1000,
    max_batch_bytes: Annotated[
        int, typer.Option(min=1, help="Value bytes per confirmed batch (bounds memory).")
    ] = 8 * 1024 * 1024,
    max_backoff: Annotated[
        float, typer.Option(help="Longest wait between retries while the broker is down.")
    ] = 5.0,
) -> None:
    """Relay ledger events to Kafka exactly once per seq (``status``: where it stands).

    Runs until SIGINT/SIGTERM, retrying broker errors with capped backoff, or with
    ``--once`` publishes up to the head and exits.
    """
    if ctx.invoked_subcommand is not None:
        return
    from consumers.relay import CLOUDTRAIL_VIEW, AuditRelay

    cli = _ctx(ctx)
    if not bootstrap:
        raise ValidationError("--bootstrap (or KEYLEDGER_KAFKA_BOOTSTRAP) is required.")
    view = _check_view(view)
    ledger = cli.ledger_without_hsm
    from ledger import audit

    def new_checkpoints(after_id: int) -> list[tuple[int, int, str]]:
        return [(c.id, c.size, c.note) for c in audit.checkpoints(ledger.db) if c.id > after_id]

    relay = AuditRelay(
        reader=ledger.db,
        positions=ledger.db,
        bootstrap=bootstrap,
        ledger_id=ledger.ledger_id,
        view=view,
        topic=topic,
        partitions=partitions,
        batch_size=batch_size,
        max_batch_bytes=max_batch_bytes,
        max_backoff=max_backoff,
        checkpoints=new_checkpoints if view == CLOUDTRAIL_VIEW else None,
    )
    try:
        if once:
            n = relay.run_once()
            typer.echo(f"published {n} records to {relay.topic}")
        else:
            with stop_on_signals() as stop:  # Ctrl-C/SIGTERM: a clean stop
                relay.run_forever(poll_interval=poll_interval, stop=stop)
    finally:
        relay.close()


@stream_app.command("status")
def stream_status(
    ctx: typer.Context,
    bootstrap: _BootstrapOpt = None,
    view: _ViewOpt = "cloudtrail",
    topic: _TopicOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker.")] = 5.0,
) -> None:
    """Ledger head, relay position, lag (events, seconds) and the topic's highest seq.

    Exits 0 when the broker is unreachable (it says so); the ledger part still shows.
    """
    from datetime import UTC, datetime

    from consumers.relay import relay_status

    cli = _ctx(ctx)
    ledger = cli.ledger_without_hsm
    now = cli.clock.now() if cli.clock is not None else datetime.now(UTC)
    status = relay_status(
        reader=ledger.db,
        positions=ledger.db,
        now=now,
        view=_check_view(view),
        topic=topic,
        bootstrap=bootstrap,
        timeout=timeout,
    )
    if status.topic_seq is not None:
        on_topic = str(status.topic_seq)
    elif status.broker_error:
        on_topic = f"unknown (broker unreachable: {status.broker_error})"
    else:
        on_topic = "unknown (no --bootstrap)"
    text = "\n".join(
        [
            f"topic: {status.topic} (view {status.view})",
            f"ledger head seq: {status.head_seq}",
            f"relay position: {status.position}",
            f"lag: {status.lag_events} events, {status.lag_seconds:.1f} s",
            f"highest seq on topic: {on_topic}",
        ]
    )
    _emit(cli, status.as_dict(), text)


@app.command("demo")
def demo(ctx: typer.Context) -> None:
    """The main job end to end on the embedded defaults, one line per step."""
    from cli.demo import run_demo

    run_demo(_ctx(ctx))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: the one place errors become exit codes (raises SystemExit).

    Usage errors are typer's (exit 2); KeyLedger errors print one line and exit 1;
    anything unexpected prints only its type (its message could hold data) and exits 1.
    """
    try:
        app(args=argv, prog_name="keyledger")
    except KeyLedgerError as err:
        typer.echo(f"error: {err.aws_name}: {err.message}", err=True)
        sys.exit(1)
    except OSError as exc:
        typer.echo(f"error: {exc.strerror or type(exc).__name__}: {exc.filename or ''}", err=True)
        sys.exit(1)
    except Exception as exc:
        typer.echo(f"error: KMSInternalException: {type(exc).__name__}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
