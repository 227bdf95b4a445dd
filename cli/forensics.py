"""``keyledger audit trail|stats|last-used|investigate`` over the usage index, and
``keyledger projections rebuild``.

Every answer comes from the usage index (``projections.usage``), caught up to the log
head first; ``projections.scan`` gives the same answers by a full scan (tests compare).
"""

from __future__ import annotations

import csv
import io
import re
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from cli.common import ctx_of, parse_time
from cli.context import CliContext
from ledger.errors import ValidationError

investigate_app = typer.Typer(help="Canned forensic investigations.", no_args_is_help=True)

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key", help="Key id, key ARN, alias name or alias ARN (aliases as they were then)."
    ),
]
PrincipalOpt = Annotated[str | None, typer.Option("--principal", help="Principal ARN.")]
OperationOpt = Annotated[
    list[str] | None, typer.Option("--operation", help="Operation name (repeatable).")
]
SinceOpt = Annotated[str | None, typer.Option("--since", help="RFC 3339 time (inclusive).")]
UntilOpt = Annotated[str | None, typer.Option("--until", help="RFC 3339 time (inclusive).")]
ErrorOpt = Annotated[
    str | None,
    typer.Option(
        "--error",
        help="Only failed calls; with a code (e.g. AccessDeniedException) only that code; "
        "'any' for every failure.",
    ),
]
ContextOpt = Annotated[
    list[str] | None, typer.Option("--context", help="Encryption context pair k=v (repeatable).")
]
SourceIpOpt = Annotated[str | None, typer.Option("--source-ip", help="Caller source IP.")]


def _index(cli: CliContext) -> Any:
    from projections.usage import UsageIndex

    return UsageIndex(cli.ledger_without_hsm.db)


def key_filters(cli: CliContext, key: str) -> dict[str, Any]:
    """``Filters`` fields for ``--key``: resolved ARN or alias ARN, and KeyId as sent.

    Raises ValidationError for text that is none of id, key ARN, alias name, alias ARN.
    """
    s = cli.settings
    if key.startswith("alias/"):
        return {"alias_arn": f"arn:aws:kms:{s.region}:{s.account_id}:{key}", "key_sent": key}
    if key.startswith("arn:") and ":alias/" in key:
        return {"alias_arn": key, "key_sent": key}
    if key.startswith("arn:") and ":key/" in key:
        return {"key_arns": [key], "key_sent": key}
    if _UUID.match(key):
        return {"key_arns": [s.key_arn(key)], "key_sent": key}
    raise ValidationError(f"--key must be a key id, key ARN, alias name or alias ARN, not '{key}'.")


def _us(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    d = parse_time(text, option)
    return int(d.timestamp()) * 1_000_000 + d.microsecond


def build_filters(
    cli: CliContext,
    *,
    key: str | None = None,
    principal: str | None = None,
    operation: list[str] | None = None,
    since: str | None = None,
    until: str | None = None,
    error: str | None = None,
    context: list[str] | None = None,
    source_ip: str | None = None,
    limit: int | None = None,
) -> Any:
    """The index filters of the CLI options. Raises ValidationError on bad values."""
    from projections.usage import Filters

    pairs = []
    for item in context or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValidationError(f"--context must be k=v, not '{item}'.")
        pairs.append((k, v))
    if limit is not None and limit < 1:
        raise ValidationError("--limit must be at least 1.")
    fields: dict[str, Any] = key_filters(cli, key) if key else {}
    return Filters(
        **fields,
        principal=principal,
        operations=list(operation or []),
        since_us=_us(since, "--since"),
        until_us=_us(until, "--until"),
        error=error is not None,
        error_code=error if error not in (None, "any") else None,
        context=pairs,
        source_ip=source_ip,
        limit=limit,
    )


def row_line(r: dict[str, Any]) -> str:
    outcome = r["error_code"] or "OK"
    ctx = f" context={r['context']}" if r.get("context") else ""
    sent = r.get("key_sent")
    via = f" (as {sent})" if sent and sent != r.get("key_arn") else ""
    ip = f" from {r['source_ip']}" if r.get("source_ip") else ""
    return (
        f"{int(r['seq']):>7}  {r['time'][:23]}  {r['operation'] or '?':<22} {outcome:<28} "
        f"{r['principal'] or '?'}{ip}  {r['key_arn'] or '-'}{via}{ctx}"
    )


CSV_COLUMNS = (
    "seq",
    "time",
    "operation",
    "error_code",
    "principal",
    "account",
    "source_ip",
    "user_agent",
    "key_arn",
    "key_sent",
    "source_key_arn",
    "context",
    "algorithm",
    "request_id",
    "event_id",
)


def emit_rows(cli: CliContext, rows: list[dict[str, Any]], fmt: str) -> None:
    """Rows as a table, CloudTrail JSON lines (``json``) or CSV."""
    from consumers.cloudtrail import cloudtrail_record, event_id
    from projections.usage import stored_records

    ledger = cli.ledger_without_hsm
    if fmt == "json":
        lid = ledger.ledger_id if rows else ""
        for record in stored_records(ledger.db, [int(r["seq"]) for r in rows]):
            value = cloudtrail_record(
                record.event(),
                seq=record.seq,
                record_hash=record.record_hash,
                prev=record.prev,
                ledger_id=lid,
            )
            typer.echo(orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode())
    elif fmt == "csv":
        lid = ledger.ledger_id if rows else ""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for r in rows:
            full = {**r, "event_id": event_id(lid, int(r["seq"]))}
            w.writerow(["" if full.get(c) is None else full[c] for c in CSV_COLUMNS])
        typer.echo(buf.getvalue(), nl=False)
    else:
        typer.echo("\n".join(row_line(r) for r in rows) if rows else "(no events)")


def _fmt(cli: CliContext, csv_out: bool) -> str:
    return "csv" if csv_out else ("json" if cli.json_output else "table")


def audit_trail(
    ctx: typer.Context,
    key: KeyOpt = None,
    principal: PrincipalOpt = None,
    operation: OperationOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    error: ErrorOpt = None,
    context: ContextOpt = None,
    source_ip: SourceIpOpt = None,
    limit: Annotated[int, typer.Option(help="Show the last N matching calls.")] = 50,
    csv_out: Annotated[bool, typer.Option("--csv", help="CSV instead of a table.")] = False,
) -> None:
    """Who did what with which key, when, from where, with what outcome (denied and
    failed attempts included). --json prints CloudTrail records, one per line."""
    cli = ctx_of(ctx)
    f = build_filters(
        cli,
        key=key,
        principal=principal,
        operation=operation,
        since=since,
        until=until,
        error=error,
        context=context,
        source_ip=source_ip,
        limit=limit,
    )
    emit_rows(cli, _index(cli).trail(f), _fmt(cli, csv_out))


def audit_stats(
    ctx: typer.Context,
    by: Annotated[
        str, typer.Option(help="Group by key, principal, operation, error or source_ip.")
    ] = "key",
    per: Annotated[str | None, typer.Option(help="Also per 'day' or 'hour' (UTC).")] = None,
    top: Annotated[int | None, typer.Option(help="Only the N largest groups.")] = None,
    key: KeyOpt = None,
    principal: PrincipalOpt = None,
    operation: OperationOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    error: ErrorOpt = None,
) -> None:
    """Call counts per key, principal, operation (and day or hour), with first and last
    use, largest first."""
    cli = ctx_of(ctx)
    if by not in ("key", "principal", "operation", "error", "source_ip"):
        raise ValidationError(
            f"--by must be key, principal, operation, error or source_ip, not '{by}'."
        )
    if per not in (None, "day", "hour"):
        raise ValidationError(f"--per must be day or hour, not '{per}'.")
    f = build_filters(
        cli,
        key=key,
        principal=principal,
        operation=operation,
        since=since,
        until=until,
        error=error,
    )
    rows = _index(cli).stats(f, by, per, top)
    if cli.json_output:
        typer.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    if not rows:
        typer.echo("(no events)")
    for r in rows:
        period = f"{r['period']}  " if per else ""
        typer.echo(f"{r['n']:>9}  {period}{r['grp'] or '-'}  first {r['first']}  last {r['last']}")


def last_used_doc(cli: CliContext, key: str) -> dict[str, Any]:
    """GetKeyLastUsage's response for a key id or ARN (aliases are not accepted, as in
    AWS). Raises ValidationError, NotFoundError."""
    from consumers.cloudtrail import event_id
    from ledger.errors import NotFoundError

    if key.startswith("alias/") or ":alias/" in key:
        raise ValidationError("Alias names are not supported: give a key id or key ARN.")
    fields = key_filters(cli, key)
    arn = fields["key_arns"][0]
    created = None
    for doc in cli.catalog.key_docs():
        if doc["arn"] == arn:
            created = doc["created"]
    if created is None:
        raise NotFoundError(f"Key '{arn}' does not exist")
    row = _index(cli).last_used(arn)
    out: dict[str, Any] = {
        "KeyId": arn.rsplit("/", 1)[1],
        "KeyCreationDate": created,
        "TrackingStartDate": created,
        "KeyLastUsage": {},
    }
    if row is not None:
        out["KeyLastUsage"] = {
            "Operation": row["operation"],
            "Timestamp": row["time"],
            "CloudTrailEventId": event_id(cli.ledger_without_hsm.ledger_id, int(row["seq"])),
            "KmsRequestId": row["request_id"],
        }
    return out


def audit_last_used(
    ctx: typer.Context, key: Annotated[str, typer.Argument(help="Key id or key ARN.")]
) -> None:
    """The key's last successful cryptographic use (GetKeyLastUsage semantics)."""
    cli = ctx_of(ctx)
    doc = last_used_doc(cli, key)
    if cli.json_output:
        typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return
    used = doc["KeyLastUsage"]
    if not used:
        typer.echo(
            f"{doc['KeyId']}: no successful cryptographic use since {doc['KeyCreationDate']}"
        )
    else:
        typer.echo(
            f"{doc['KeyId']}: last {used['Operation']} at {used['Timestamp']} "
            f"(event {used['CloudTrailEventId']}, request {used['KmsRequestId']})"
        )


# ---------------------------------------------------------------- investigations

MANAGEMENT_OF_ACCESS = ("PutKeyPolicy", "CreateGrant", "RetireGrant", "RevokeGrant")


def investigate_key(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key id, key ARN, alias name or alias ARN.")],
) -> None:
    """A key's lifecycle timeline, its usage, denied attempts, and who changed its
    policy and grants."""
    cli = ctx_of(ctx)
    index = _index(cli)
    f = build_filters(cli, key=key)
    lifecycle = index.trail(replace(f, lifecycle=True))
    access = index.trail(replace(f, operations=list(MANAGEMENT_OF_ACCESS)))
    denied = index.trail(replace(f, error_code="AccessDeniedException"))
    usage = index.stats(f, "operation")
    report = {
        "lifecycle": lifecycle,
        "usage": usage,
        "denied": denied,
        "policyAndGrantChanges": access,
    }
    if cli.json_output:
        typer.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    typer.echo(f"== lifecycle ({len(lifecycle)} events)")
    emit_rows(cli, lifecycle, "table")
    typer.echo(f"== usage by operation ({sum(u['n'] for u in usage)} calls)")
    for u in usage:
        typer.echo(f"{u['n']:>9}  {u['grp']}  first {u['first']}  last {u['last']}")
    typer.echo(f"== denied attempts ({len(denied)})")
    emit_rows(cli, denied, "table")
    typer.echo(f"== policy and grant changes ({len(access)})")
    emit_rows(cli, access, "table")


def investigate_principal(
    ctx: typer.Context, principal: Annotated[str, typer.Argument(help="Principal ARN.")]
) -> None:
    """What a principal did: keys and operations used, sources, failures and denials."""
    cli = ctx_of(ctx)
    index = _index(cli)
    f = build_filters(cli, principal=principal)
    report = {
        "byKey": index.stats(f, "key"),
        "byOperation": index.stats(f, "operation"),
        "bySourceIp": index.stats(f, "source_ip"),
        "failures": index.stats(build_filters(cli, principal=principal, error="any"), "error"),
    }
    if cli.json_output:
        typer.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    for title, rows in report.items():
        typer.echo(f"== {title} ({sum(r['n'] for r in rows)} calls)")
        for r in rows:
            typer.echo(f"{r['n']:>9}  {r['grp'] or '-'}  first {r['first']}  last {r['last']}")


def pending_deletion_use(
    cli: CliContext, days: int, now: datetime, limit: int = 50
) -> dict[str, Any]:
    """Calls (any outcome) in the ``days`` before ``now`` on keys that are now pending
    deletion or disabled: counts per key with first and last call, and the last
    ``limit`` calls."""
    from projections.usage import Filters

    keys = sorted(
        d["arn"]
        for d in cli.catalog.key_docs()
        if not d["deleted"] and d["state"] in ("PendingDeletion", "Disabled")
    )
    if not keys:
        return {"keys": [], "calls": []}
    since = now - timedelta(days=days)
    f = Filters(key_arns=keys, since_us=int(since.timestamp() * 1_000_000))
    index = _index(cli)
    return {"keys": index.stats(f, "key"), "calls": index.trail(replace(f, limit=limit))}


def investigate_pending_deletion(
    ctx: typer.Context,
    days: Annotated[int, typer.Option(min=1, help="Look back this many days.")] = 30,
    now: Annotated[str | None, typer.Option(help="Count back from this RFC 3339 time.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show the last N calls.")] = 50,
) -> None:
    """Keys pending deletion or disabled that anyone used or tried to use in the last N
    days: the check AWS recommends before deleting a key."""
    cli = ctx_of(ctx)
    at = parse_time(now, "--now") if now else datetime.now(tz=UTC)
    found = pending_deletion_use(cli, days, at, limit)
    if cli.json_output:
        typer.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
        return
    if not found["keys"]:
        typer.echo(f"no use of keys pending deletion or disabled in the last {days} days")
        return
    for r in found["keys"]:
        typer.echo(f"{r['n']:>7} calls  {r['grp']}  first {r['first']}  last {r['last']}")
    emit_rows(cli, found["calls"], "table")


def investigate_denied(
    ctx: typer.Context,
    window: Annotated[int, typer.Option(min=1, help="Max seconds between denials.")] = 300,
    threshold: Annotated[int, typer.Option(min=1, help="Denials that make a burst.")] = 5,
    since: SinceOpt = None,
    until: UntilOpt = None,
) -> None:
    """Bursts of AccessDenied by principal and source IP."""
    cli = ctx_of(ctx)
    f = build_filters(cli, since=since, until=until)
    bursts = _index(cli).denied_bursts(f, window_s=window, threshold=threshold)
    if cli.json_output:
        typer.echo(orjson.dumps(bursts, option=orjson.OPT_INDENT_2).decode())
        return
    if not bursts:
        typer.echo("no AccessDenied bursts")
    for b in bursts:
        typer.echo(
            f"{b['count']:>5} denials  {b['principal']} from {b['source_ip'] or '-'}  "
            f"{b['first']} .. {b['last']}  (seq {b['first_seq']}..{b['last_seq']})"
        )


def audit_report(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")],
    key: KeyOpt = None,
    principal: PrincipalOpt = None,
    all_calls: Annotated[bool, typer.Option("--all", help="Every call in the ledger.")] = False,
    since: SinceOpt = None,
    until: UntilOpt = None,
) -> None:
    """A self-contained HTML report (charts as inline SVG, no network fetches): usage
    over time, the lifecycle timeline, and the tables behind them."""
    from cli.report import build_report

    cli = ctx_of(ctx)
    chosen = [x for x in (key, principal, all_calls or None) if x]
    if len(chosen) != 1:
        raise ValidationError("Give exactly one of --key K, --principal P or --all.")
    f = build_filters(cli, key=key, principal=principal, since=since, until=until)
    if key:
        title, by = f"KeyLedger report: key {key}", "operation"
    elif principal:
        title, by = f"KeyLedger report: principal {principal}", "key"
    else:
        title, by = "KeyLedger report: all calls", "operation"
    page = build_report(_index(cli), title, f, by=by)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as err:
        raise ValidationError(f"--out {out}: {err.strerror}.") from None
    typer.echo(f"wrote {out} ({len(page.encode()):,} bytes)")


# ---------------------------------------------------------------- projections


def projections_rebuild(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Only this projection: catalog, usage or history."),
    ] = None,
) -> None:
    """Rebuild read models from the whole log, with progress and events/s."""
    cli = ctx_of(ctx)
    if name not in (None, "catalog", "usage", "history"):
        raise ValidationError(f"--name must be catalog, usage or history, not '{name}'.")
    if name in (None, "catalog"):
        t0 = time.perf_counter()
        n = cli.catalog.rebuild()
        dt = time.perf_counter() - t0
        docs = [orjson.loads(doc) for _, doc in cli.catalog.snapshot()]
        keys = sum(1 for d in docs if "key_id" in d and not d["deleted"])
        aliases = sum(1 for d in docs if "key_id" not in d and d.get("target") is not None)
        typer.echo(
            f"rebuilt catalog from {n} events ({keys} keys, {aliases} aliases) "
            f"in {dt:.2f} s ({n / dt if dt else 0:,.0f} events/s)"
        )
    if name in (None, "usage"):
        t0 = time.perf_counter()
        tty = sys.stderr.isatty()

        def progress(done: int, head: int) -> None:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            line = f"usage: {done:,}/{head:,} events ({rate:,.0f} events/s)"
            if tty:
                typer.echo("\r" + line, nl=False, err=True)

        n = _index(cli).rebuild(progress)
        dt = time.perf_counter() - t0
        if tty:
            typer.echo("", err=True)
        typer.echo(
            f"rebuilt usage index from {n} events in {dt:.2f} s "
            f"({n / dt if dt else 0:,.0f} events/s)"
        )
    if name in (None, "history"):
        from projections.views import HistoryViews

        t0 = time.perf_counter()
        views = HistoryViews(cli.ledger_without_hsm.db)
        n = views.rebuild()
        dt = time.perf_counter() - t0
        counts = {v: len(rows) for v, rows in views.rows().items()}
        typer.echo(
            f"rebuilt history views from {n} events in {dt:.2f} s "
            f"({n / dt if dt else 0:,.0f} events/s): {counts['kl_grants_view']} grants, "
            f"{counts['kl_key_versions']} key versions, {counts['kl_principals_view']} principals"
        )


def register(audit_app: typer.Typer, projections_app: typer.Typer) -> None:
    """Add these commands to ``keyledger audit`` and ``keyledger projections``."""
    audit_app.command("trail")(audit_trail)
    audit_app.command("stats")(audit_stats)
    audit_app.command("last-used")(audit_last_used)
    audit_app.command("report")(audit_report)
    investigate_app.command("key")(investigate_key)
    investigate_app.command("principal")(investigate_principal)
    investigate_app.command("pending-deletion")(investigate_pending_deletion)
    investigate_app.command("denied")(investigate_denied)
    audit_app.add_typer(investigate_app, name="investigate")
    projections_app.command("rebuild")(projections_rebuild)
