"""``keyledger audit validate-archive``: the CloudTrail-layout archive checked offline,
reported like ``aws cloudtrail validate-logs`` (problems on stderr, the summary on
stdout, exit 1 when anything is invalid). Needs neither the database nor the HSM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ledger.errors import ValidationError


def validate_archive_cmd(
    archive: Annotated[Path, typer.Argument(help="Archive directory (the bucket's root).")],
    public_key: Annotated[
        Path, typer.Option("--public-key", help="Verifier keys (keyledger audit public-key).")
    ],
    start_time: Annotated[
        str | None, typer.Option("--start-time", help="From this hour (RFC 3339).")
    ] = None,
    end_time: Annotated[
        str | None, typer.Option("--end-time", help="Up to this hour (RFC 3339, default now).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Also list valid files.")] = False,
) -> None:
    """Validate the archive's digests, signatures, chain and log files offline."""
    from ledger.archive_verify import parse_time, render_header, validate_archive
    from ledger.offline_verify import VerificationError, parse_verifier_keys

    try:
        keys = parse_verifier_keys(public_key.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, VerificationError) as err:
        raise ValidationError(
            f"--public-key {public_key}: not a verifier key file ({err})."
        ) from None
    if not keys:
        raise ValidationError(f"--public-key {public_key} holds no verifier key.")
    try:
        start = parse_time(start_time) if start_time else None
        end = parse_time(end_time) if end_time else None
    except ValueError:
        raise ValidationError("--start-time and --end-time take RFC 3339 times.") from None
    try:
        report = validate_archive(archive, keys, start=start, end=end)
    except VerificationError as err:
        raise ValidationError(str(err)) from None
    typer.echo(render_header(archive, report))
    if verbose:
        for line in report.valid:
            typer.echo(line)
    for line in report.pending:
        typer.echo(line)
    for line in report.problems:
        typer.echo(line, err=True)
    typer.echo(report.summary(), nl=False)
    if not report.ok:
        raise typer.Exit(1)
