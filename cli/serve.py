"""``keyledger serve``: the AWS-KMS-compatible HTTP API (boto3, AWS CLI, Encryption SDK)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import ctx_of

DEFAULT_DEV_ACCOUNT = "000000000000"


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}"


def serve(
    ctx: typer.Context,
    host: Annotated[
        str,
        typer.Option(envvar="KEYLEDGER_API_HOST", help="Address to bind (loopback by default)."),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="KEYLEDGER_API_PORT", min=1, max=65535, help="TCP port.")
    ] = 8080,
    workers: Annotated[
        int,
        typer.Option(
            envvar="KEYLEDGER_API_WORKERS",
            min=1,
            help="Worker processes; each opens its own ledger and HSM session.",
        ),
    ] = 1,
    dev: Annotated[
        bool,
        typer.Option(
            "--dev",
            help="Development mode: any credentials accepted, POST /moto-api/reset enabled; "
            "loopback only, one worker.",
        ),
    ] = False,
    dev_account: Annotated[
        str, typer.Option(help="Account id dev-mode callers belong to.")
    ] = DEFAULT_DEV_ACCOUNT,
    request_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds before a request answers 503.")
    ] = 30.0,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Log one line per request (uvicorn's).")
    ] = False,
    inline: Annotated[
        str,
        typer.Option(
            envvar="KEYLEDGER_API_INLINE",
            help="Run Encrypt, Decrypt, GenerateDataKey, Sign ... on the event loop with "
            "grouped commits: auto (with SoftHSM2 only), on, off.",
        ),
    ] = "auto",
) -> None:
    """Serve the KMS JSON API (X-Amz-Target TrentService.*) and STS GetCallerIdentity."""
    from api.server import check_dev_host, inline_enabled
    from api.server import serve as run_server

    cli = ctx_of(ctx)
    inline_enabled(cli.settings, inline)  # fail before printing anything
    if dev:
        check_dev_host(host)
    mode = " (dev mode)" if dev else ""
    typer.echo(f"KeyLedger API listening on {_url(host, port)}{mode}")
    if dev:
        typer.echo(f"dev mode: any access key is accepted as account {dev_account}")
    run_server(
        cli.settings,
        host=host,
        port=port,
        workers=workers,
        dev=dev,
        default_account=dev_account,
        request_timeout=request_timeout,
        access_log=access_log,
        inline=inline,
    )
