"""``keyledger maintenance run``: due automatic rotations and deletions, and a signed
checkpoint when one is due (every N events, every N seconds, a heartbeat when idle:
``KEYLEDGER_CHECKPOINT_*``). ``--every S`` keeps running, one pass every S seconds."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cli.common import ctx_of, emit, parse_time
from cli.context import CliContext

maintenance_app = typer.Typer(help="Scheduled work: rotation and deletion.", no_args_is_help=True)


@maintenance_app.command("run")
def maintenance_run(
    ctx: typer.Context,
    now: Annotated[
        str | None,
        typer.Option(help="Act as if it were this RFC 3339 time (default: the system clock)."),
    ] = None,
    every: Annotated[
        float | None,
        typer.Option(min=0.1, help="Keep running: one pass every this many seconds."),
    ] = None,
    passes: Annotated[
        int | None, typer.Option(min=1, help="With --every: stop after this many passes.")
    ] = None,
) -> None:
    """Perform every rotation and deletion due now: one ``RotateKey <arn>`` or
    ``DeleteKey <arn>`` line per action, a ``Checkpoint`` line when one was made, then
    a summary."""
    import time

    from ledger.clock import FixedClock

    cli = ctx_of(ctx)
    if now is not None:
        cli.clock = FixedClock(parse_time(now, "--now"))
    done = 0
    while True:
        _one_pass(cli)
        done += 1
        if every is None or (passes is not None and done >= passes):
            return
        time.sleep(every)


def _one_pass(cli: CliContext) -> None:
    from ledger import audit
    from projections.maintenance import run_maintenance

    ledger = cli.ledger  # before the catalog, so both share this ledger and its clock
    done = run_maintenance(ledger, cli.catalog)
    resp: dict[str, Any] = {"Actions": [{"EventName": name, "KeyArn": arn} for name, arn in done]}
    lines = [f"{name} {arn}" for name, arn in done]
    reason = audit.checkpoint_due(ledger, ledger.clock.now())
    if reason is not None:
        cp = audit.make_checkpoint(ledger)
        resp["Checkpoint"] = {"Id": cp.id, "Size": cp.size, "Reason": reason}
        lines.append(f"Checkpoint {cp.id} size {cp.size} ({reason})")
    if not done and reason is None:
        text = "nothing due"
    else:
        rotated = sum(1 for name, _ in done if name == "RotateKey")
        lines.append(f"done: {rotated} rotated, {len(done) - rotated} deleted")
        text = "\n".join(lines)
    emit(cli, resp, text)
