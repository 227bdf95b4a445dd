"""``keyledger maintenance run``: due automatic rotations and deletions."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import ctx_of, emit, parse_time

maintenance_app = typer.Typer(help="Scheduled work: rotation and deletion.", no_args_is_help=True)


@maintenance_app.command("run")
def maintenance_run(
    ctx: typer.Context,
    now: Annotated[
        str | None,
        typer.Option(help="Act as if it were this RFC 3339 time (default: the system clock)."),
    ] = None,
) -> None:
    """Perform every rotation and deletion due now: one ``RotateKey <arn>`` or
    ``DeleteKey <arn>`` line per action, then a summary."""
    from ledger.clock import FixedClock
    from projections.maintenance import run_maintenance

    cli = ctx_of(ctx)
    if now is not None:
        cli.clock = FixedClock(parse_time(now, "--now"))
    ledger = cli.ledger  # before the catalog, so both share this ledger and its clock
    done = run_maintenance(ledger, cli.catalog)
    resp = {"Actions": [{"EventName": name, "KeyArn": arn} for name, arn in done]}
    if not done:
        text = "nothing due"
    else:
        rotated = sum(1 for name, _ in done if name == "RotateKey")
        lines = [f"{name} {arn}" for name, arn in done]
        lines.append(f"done: {rotated} rotated, {len(done) - rotated} deleted")
        text = "\n".join(lines)
    emit(cli, resp, text)
