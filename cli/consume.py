"""``keyledger consume ...``: Kafka consumers of the audit stream (consumer groups;
offsets committed only after processing, up to the contiguous processed position):
the CloudTrail-layout archive writer, the Splunk HEC forwarder, and the detections.

Each command is a thin layer over its ``consumers`` module."""

from __future__ import annotations

import typer

from cli.common import stop_on_signals

consume_app = typer.Typer(
    help="Consumers of the audit topic: archive writer, Splunk HEC forwarder, detections.",
    no_args_is_help=True,
)

# ---------------------------------------------------------------- archive


@consume_app.command("archive")
def consume_archive(
    ctx: typer.Context,
    out: str = typer.Option(..., "--out", help="Archive directory (stands for the S3 bucket)."),
    bootstrap: str | None = typer.Option(
        None, envvar="KEYLEDGER_KAFKA_BOOTSTRAP", help="Kafka bootstrap HOST:PORT."
    ),
    topic: str = typer.Option("keyledger.audit.v1", help="Audit topic to read."),
    group: str = typer.Option("keyledger-archive", help="Kafka consumer group id."),
    once: bool = typer.Option(False, "--once", help="Archive until caught up, then exit."),
    bucket: str = typer.Option("keyledger-archive", help="Bucket name the digests record."),
    trail: str = typer.Option("keyledger", help="Trail name in digest file names."),
    close_after: int = typer.Option(
        300, min=0, help="Seconds after an hour's end before it is sealed without new records."
    ),
    flush_interval: float = typer.Option(60.0, min=0.1, help="Most seconds a record waits."),
    max_records: int = typer.Option(5000, min=1, help="Most records per log file."),
    start_seq: int = typer.Option(1, min=1, help="First seq of a new archive."),
) -> None:
    """Write the audit topic to hourly CloudTrail log files with signed, chained digests.

    Every seq lands in exactly one log file across restarts; run one writer per
    archive directory. Digests are signed by the ledger's Ed25519 key in the HSM.
    Check the archive with ``keyledger audit validate-archive``.
    """
    from datetime import timedelta
    from pathlib import Path

    from cli.common import ctx_of
    from consumers.archive import ArchiveError, ArchiveStore, ArchiveWriter
    from ledger import audit
    from ledger.errors import ValidationError

    if not bootstrap:
        raise ValidationError("--bootstrap (or KEYLEDGER_KAFKA_BOOTSTRAP) is required.")
    cli = ctx_of(ctx)
    ledger = cli.ledger
    key = audit.ensure_signing_key(ledger)[-1]
    try:
        store = ArchiveStore(
            Path(out),
            signer=ledger.keystore,
            signing_label=key.label,
            public_key=key.public_key,
            bucket=bucket,
            trail=trail,
            default_account=ledger.settings.account_id,
            default_region=ledger.settings.region,
            max_records_per_file=max_records,
            start_seq=start_seq,
        )
    except (ArchiveError, ValueError) as exc:
        raise ValidationError(f"archive {out}: {exc}") from None
    writer = ArchiveWriter(
        store=store,
        bootstrap=bootstrap,
        topic=topic,
        group=group,
        clock=cli.clock,
        close_after=timedelta(seconds=close_after),
        flush_interval=flush_interval,
    )
    with stop_on_signals() as stop:  # Ctrl-C/SIGTERM: a clean stop
        try:
            if once:
                n = writer.run_once()
            else:
                before = store.archived_seq
                writer.run_forever(stop)
                n = store.archived_seq - before
        except ArchiveError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        finally:
            writer.close()
    typer.echo(
        f"archived {n} records from {topic} to {out}: {store.files_written} log files, "
        f"{store.digests_written} digests (up to seq {store.archived_seq})"
    )


# ---------------------------------------------------------------- hec


@consume_app.command("hec")
def consume_hec(
    url: str = typer.Option(
        ..., "--url", help="HEC URL, e.g. https://splunk:8088/services/collector/event."
    ),
    bootstrap: str | None = typer.Option(
        None, envvar="KEYLEDGER_KAFKA_BOOTSTRAP", help="Kafka bootstrap HOST:PORT."
    ),
    topic: str = typer.Option("keyledger.audit.v1", help="Audit topic to read."),
    group: str = typer.Option("keyledger-hec", help="Kafka consumer group id."),
    once: bool = typer.Option(False, "--once", help="Forward until caught up, then exit."),
    batch_size: int = typer.Option(500, min=1, help="Most events per POST."),
) -> None:
    """Forward audit records to Splunk HEC (at least once; token in KEYLEDGER_HEC_TOKEN).

    A record may be sent twice if the forwarder dies between a POST and its commit;
    deduplicate on fields.seq or the event's eventID.
    """
    import os

    from consumers.hec import TOKEN_ENV, HecClient, HecForwarder
    from ledger.errors import ValidationError

    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ValidationError(f"{TOKEN_ENV} is not set: export the HEC token in it.")
    if not bootstrap:
        raise ValidationError("--bootstrap (or KEYLEDGER_KAFKA_BOOTSTRAP) is required.")
    forwarder = HecForwarder(
        client=HecClient(url, token),
        bootstrap=bootstrap,
        topic=topic,
        group_id=group,
        batch_size=batch_size,
    )
    with stop_on_signals() as stop:  # Ctrl-C/SIGTERM: a clean stop
        stats = forwarder.run(stop=stop, once=once)
    typer.echo(f"forwarded {stats.records} records from {topic} in {stats.batches} batches")


# ---------------------------------------------------------------- detect


@consume_app.command("detect")
def consume_detect(
    bootstrap: str | None = typer.Option(
        None, envvar="KEYLEDGER_KAFKA_BOOTSTRAP", help="Kafka bootstrap HOST:PORT."
    ),
    topic: str = typer.Option("keyledger.audit.v1", help="Audit topic to read."),
    alerts_topic: str = typer.Option(
        "keyledger.alerts.v1", "--alerts-topic", help="Topic the alerts go to."
    ),
    group: str = typer.Option("keyledger-detect", help="Kafka consumer group id."),
    once: bool = typer.Option(False, "--once", help="Evaluate until caught up, then exit."),
    rules: str | None = typer.Option(
        None, "--rules", help="Directory of Sigma rule files (default: the shipped rules)."
    ),
) -> None:
    """Evaluate the Sigma detections over the audit topic; print and publish alerts.

    Prints one JSON line per alert on stdout, after the broker confirmed it. Records are
    evaluated in ledger seq order, so run one instance per group. On start the topic is
    re-read from the beginning to rebuild correlation and first-seen state.
    """
    from pathlib import Path

    from consumers.detections import (
        DetectionConsumer,
        DetectionError,
        SigmaRuleError,
        alert_line,
        load_rules,
    )
    from ledger.errors import ValidationError

    if not bootstrap:
        raise ValidationError("--bootstrap (or KEYLEDGER_KAFKA_BOOTSTRAP) is required.")
    try:
        rule_set = load_rules(Path(rules) if rules else None)
    except SigmaRuleError as exc:
        typer.echo(f"error: invalid rules: {exc}", err=True)
        raise typer.Exit(1) from None
    detector = DetectionConsumer(
        bootstrap=bootstrap,
        rules=rule_set,
        topic=topic,
        alerts_topic=alerts_topic,
        group=group,
        on_alert=lambda alert: typer.echo(alert_line(alert)),
    )
    with stop_on_signals() as stop:  # Ctrl-C/SIGTERM: a clean stop
        try:
            if once:
                result = detector.run(once=True, stop=stop)
                typer.echo(
                    f"evaluated {result.evaluated} records from {topic}, "
                    f"{result.alerts} alerts to {alerts_topic}",
                    err=True,
                )
            else:
                detector.run_forever(stop)
        except DetectionError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
