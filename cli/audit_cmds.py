"""``keyledger audit``: live and offline verification, checkpoints, proofs, per-key
history, export bundles and the ledger signing key.

Live ``verify`` prints ``FAIL: position N: reason`` lines (exit 1) or one ``OK`` line;
``verify --bundle`` prints ``INVALID: ...`` lines like ``aws cloudtrail validate-logs``
and a summary, and needs neither the database nor the HSM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from cli.archive_cmds import validate_archive_cmd
from cli.common import ctx_of
from ledger.errors import TamperError, ValidationError

signing_key_app = typer.Typer(help="The ledger's checkpoint signing key.", no_args_is_help=True)


def _read_vkeys(path: Path) -> list[Any]:
    from ledger.offline_verify import VerificationError, parse_verifier_keys

    try:
        keys = parse_verifier_keys(path.read_text(encoding="utf-8"))
    except (VerificationError, UnicodeDecodeError) as err:
        raise ValidationError(f"--public-key {path}: not a verifier key file ({err}).") from None
    if not keys:
        raise ValidationError(f"--public-key {path} holds no verifier key.")
    return keys


def _derive_view(event: dict[str, Any], seq: int, rh: bytes, prev: bytes, lid: str) -> Any:
    from consumers.cloudtrail import cloudtrail_record

    # The published value is serialised with sorted keys; compare as parsed JSON.
    value = cloudtrail_record(event, seq=seq, record_hash=rh, prev=prev, ledger_id=lid)
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))


def verify_bundle_cmd(
    bundle: Path, public_key: Path | None, siem_copy: Path | None, kept: list[Path]
) -> None:
    """Offline: verify an export bundle with only the auditor's public key."""
    from ledger.offline_verify import VerificationError, verify_bundle

    if public_key is None:
        raise ValidationError("--bundle needs --public-key FILE (the ledger's verifier key).")
    keys = _read_vkeys(public_key)
    try:
        report = verify_bundle(
            bundle,
            keys,
            siem_copy=siem_copy,
            derive_view=_derive_view,
            kept_checkpoints=[p.read_text(encoding="utf-8") for p in kept],
        )
    except VerificationError as err:
        raise ValidationError(str(err)) from None
    for problem in report.problems:
        typer.echo(problem)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


def verify_live(
    ctx: typer.Context,
    expect_head: bytes | None,
    expect_count: int | None,
    public_key: Path | None,
) -> None:
    """Chain, per-key chains, tree and checkpoints of the live ledger."""
    from ledger import audit
    from ledger.chain import verify_chain
    from ledger.offline_verify import key_of_record, leaf_hash
    from ledger.records import GENESIS

    cli = ctx_of(ctx)
    ledger = cli.ledger_without_hsm
    db = ledger.db
    try:
        result = verify_chain(
            db.iter_chain(), db.iter_events(), expect_head=expect_head, expect_count=expect_count
        )
    except TamperError as err:
        typer.echo(f"FAIL: position {err.position}: {err.reason}")
        raise typer.Exit(1) from None
    problems: list[str] = []
    heads: dict[str, tuple[int, bytes]] = {}

    def leaves() -> Any:
        for seq, data, digest, _, key, key_seq, key_prev in db.iter_records_with_keys(
            1, result.count
        ):
            own = key_of_record(data)
            if own != key:
                problems.append(f"position {seq}: key chain entry names the wrong key")
            elif own is not None:
                kseq, kprev = heads.get(own, (0, GENESIS))
                if key_seq != kseq + 1 or key_prev != kprev:
                    problems.append(f"position {seq}: key chain break (key {own})")
                heads[own] = (kseq + 1, digest)
            yield leaf_hash(data)

    keys = _read_vkeys(public_key) if public_key else audit.verifier_keys(db)
    origin = audit.origin_of(ledger.ledger_id) if result.count else ""
    stream = leaves()
    valid, cp_problems = audit.verify_checkpoints_live(db, stream, result.count, keys, origin)
    for _ in stream:  # the per-key checks of records after the last checkpoint
        pass
    problems = sorted(problems + cp_problems, key=_position)
    if problems:
        for p in problems:
            typer.echo(f"FAIL: {p}")
        raise typer.Exit(1)
    if result.count and audit.tree_size(db) != result.count:
        typer.echo(f"FAIL: position {audit.tree_size(db) + 1}: tree size differs from the log")
        raise typer.Exit(1)
    typer.echo(f"OK: {result.count} events, head {result.head_hex}, {valid} checkpoints valid")


def _position(problem: str) -> int:
    try:
        return int(problem.split(":", 1)[0].split()[1])
    except (IndexError, ValueError):
        return 0


def register(audit_app: typer.Typer) -> None:
    """Add the commands of this module to ``keyledger audit``."""
    audit_app.command("checkpoint")(checkpoint)
    audit_app.command("checkpoints")(list_checkpoints)
    audit_app.command("prove")(prove)
    audit_app.command("history")(history)
    audit_app.command("export")(export)
    audit_app.command("public-key")(public_key_cmd)
    audit_app.command("validate-archive")(validate_archive_cmd)
    audit_app.add_typer(signing_key_app, name="signing-key")


def checkpoint(ctx: typer.Context) -> None:
    """Sign the current tree head in the HSM; prints the signed checkpoint note."""
    from ledger import audit

    cli = ctx_of(ctx)
    cp = audit.make_checkpoint(cli.ledger)
    if cli.json_output:
        typer.echo(orjson.dumps({"Id": cp.id, "Size": cp.size, "Note": cp.note}).decode())
    else:
        typer.echo(f"checkpoint {cp.id}: size {cp.size}", err=True)
        typer.echo(cp.note, nl=False)


def list_checkpoints(ctx: typer.Context) -> None:
    """One line per stored checkpoint: id, size, time, root."""
    from ledger import audit

    cli = ctx_of(ctx)
    cps = audit.checkpoints(cli.ledger_without_hsm.db)
    for cp in cps:
        typer.echo(f"{cp.id:>6}  size {cp.size:<10} {cp.created}  {cp.root.hex()}")
    if not cps:
        typer.echo("(no checkpoints)")


def prove(
    ctx: typer.Context,
    seq: Annotated[int | None, typer.Option(help="Inclusion proof of record SEQ.")] = None,
    checkpoint_id: Annotated[
        int | None, typer.Option("--checkpoint", help="Against this checkpoint id.")
    ] = None,
    from_size: Annotated[int | None, typer.Option(help="Consistency proof from size.")] = None,
    to_size: Annotated[int | None, typer.Option(help="Consistency proof to size.")] = None,
) -> None:
    """Inclusion proof (c2sp.org/tlog-proof) or consistency proof, on stdout."""
    from ledger import audit

    db = ctx_of(ctx).ledger_without_hsm.db
    if seq is not None and from_size is None and to_size is None:
        typer.echo(audit.prove_inclusion(db, seq, checkpoint_id), nl=False)
    elif seq is None and from_size is not None and to_size is not None:
        typer.echo(audit.prove_consistency(db, from_size, to_size), nl=False)
    else:
        raise ValidationError("Give --seq N, or --from-size A and --to-size B.")


def history(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key id, alias or ARN.")],
) -> None:
    """A key's records, the keyPrev chain back to its first record, and the inclusion
    proof of its last record against the latest checkpoint."""
    from ledger import audit

    cli = ctx_of(ctx)
    ledger = cli.ledger_without_hsm
    arn = _key_arn(ledger, key)
    entries = audit.key_history(ledger.db, arn)
    if not entries:
        raise ValidationError(f"The ledger holds no records of {arn}.")
    audit.verify_key_history(entries, arn)
    for e in entries:
        event = orjson.loads(e.data)
        op = event.get("call", {}).get("operation", "?")
        outcome = event.get("error_code") or "OK"
        typer.echo(
            f"{e.seq:>8} key#{e.key_seq:<5} {event.get('timestamp', '')[:23]}  {op:<28} "
            f"{outcome:<20} {e.record_hash.hex()[:16]} <- {e.key_prev.hex()[:16]}"
        )
    typer.echo(
        f"key chain: {len(entries)} records of {arn}, linked back to its first record "
        f"(seq {entries[0].seq})"
    )
    latest = audit.latest_checkpoint(ledger.db)
    if latest is None or latest.size < entries[-1].seq:
        typer.echo("head not yet covered by a checkpoint (run keyledger audit checkpoint)")
        return
    typer.echo(f"inclusion proof of seq {entries[-1].seq} against checkpoint {latest.id}:")
    typer.echo(audit.prove_inclusion(ledger.db, entries[-1].seq, latest.id), nl=False)


def _key_arn(ledger: Any, key: str) -> str:
    if key.startswith("arn:") and ":key/" in key:
        return key
    return str(ledger.settings.key_arn(str(ledger.resolve_key_id(key))))


def export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="New directory for the bundle.")],
    from_seq: Annotated[int, typer.Option(min=1, help="First record.")] = 1,
    to_seq: Annotated[int | None, typer.Option(min=1, help="Last record (default head).")] = None,
) -> None:
    """Write an audit bundle an auditor verifies offline with the public key."""
    from ledger import audit

    ledger = ctx_of(ctx).ledger_without_hsm
    manifest = audit.write_export(ledger, out, from_seq, to_seq)
    last = to_seq or ledger.db.head_seq()
    n = len(audit.checkpoints(ledger.db))
    typer.echo(f"exported records {from_seq}..{last} and {n} checkpoints to {out}")
    del manifest


def public_key_cmd(ctx: typer.Context) -> None:
    """The ledger's verifier keys (C2SP vkey), one per line, for --public-key."""
    from ledger import audit

    keys = audit.signing_keys(ctx_of(ctx).ledger_without_hsm.db)
    if not keys:
        raise ValidationError("No signing key yet: run keyledger audit checkpoint.")
    for k in keys:
        typer.echo(k.vkey)


@signing_key_app.command("rotate")
def rotate_signing_key(ctx: typer.Context) -> None:
    """Add a new HSM signing key; until the old one is retired both sign."""
    from ledger import audit

    cli = ctx_of(ctx)
    audit.ensure_signing_key(cli.ledger)
    key = audit.add_signing_key(cli.ledger)
    typer.echo(key.vkey)


@signing_key_app.command("retire")
def retire_signing_key(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Key name to retire.")]
) -> None:
    """Stop signing with NAME and destroy its private key in the HSM."""
    from ledger import audit

    key = audit.retire_signing_key(ctx_of(ctx).ledger, name)
    typer.echo(f"retired {key.name}")


@signing_key_app.command("list")
def list_signing_keys(ctx: typer.Context) -> None:
    """Every signing key: name, created, retired."""
    from ledger import audit

    for k in audit.signing_keys(ctx_of(ctx).ledger_without_hsm.db):
        state = f"retired {k.retired}" if k.retired else "active"
        typer.echo(f"{k.name}  created {k.created}  {state}")
