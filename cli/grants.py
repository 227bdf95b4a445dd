"""``keyledger grants ...``: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant,
RevokeGrant."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cli.common import (
    AsOfOpt,
    AtSeqOpt,
    LimitOpt,
    MarkerOpt,
    ctx_of,
    emit,
    emit_list,
    parse_pairs,
    point_in_time,
    recorded_failure,
)
from ledger.errors import ValidationError

grants_app = typer.Typer(help="Create, list, retire and revoke grants.", no_args_is_help=True)

KeyOpt = Annotated[str, typer.Option("--key", help="Key id or ARN.")]
PairsOpt = list[str] | None


def _grant_line(g: dict[str, Any]) -> str:
    ops = ",".join(g.get("Operations", []))
    return f"{g['GrantId']}  {g['GranteePrincipal']}  {ops}"


@grants_app.command("create")
def grants_create(
    ctx: typer.Context,
    key: KeyOpt,
    grantee: Annotated[str, typer.Option(help="GranteePrincipal.")],
    operation: Annotated[
        list[str], typer.Option("--operation", help="Granted operation (repeatable).")
    ],
    retiring: Annotated[str | None, typer.Option(help="RetiringPrincipal.")] = None,
    name: Annotated[str | None, typer.Option(help="Grant name (makes retries idempotent).")] = None,
    context_subset: Annotated[
        PairsOpt, typer.Option(help="EncryptionContextSubset constraint key=value.")
    ] = None,
    context_equals: Annotated[
        PairsOpt, typer.Option(help="EncryptionContextEquals constraint key=value.")
    ] = None,
) -> None:
    """CreateGrant: prints the GrantId, then the GrantToken (shown only once)."""
    cli = ctx_of(ctx)
    try:
        constraints: dict[str, Any] = {}
        if context_subset:
            constraints["EncryptionContextSubset"] = parse_pairs(context_subset, "Constraint")
        if context_equals:
            constraints["EncryptionContextEquals"] = parse_pairs(context_equals, "Constraint")
    except ValidationError as err:
        request = {"keyId": key, "granteePrincipal": grantee, "operations": operation}
        cli.ledger_without_hsm.record_rejected(
            operation="CreateGrant", caller=cli.caller, request=request, error=err
        )
        raise
    resp = cli.ledger_without_hsm.create_grant(
        caller=cli.caller,
        key_id=key,
        grantee_principal=grantee,
        operations=operation,
        retiring_principal=retiring,
        constraints=constraints or None,
        name=name,
    )
    emit(cli, resp, f"{resp['GrantId']}\n{resp['GrantToken']}")


@grants_app.command("list")
def grants_list(
    ctx: typer.Context,
    key: KeyOpt,
    grant_id: Annotated[str | None, typer.Option(help="Only this GrantId.")] = None,
    grantee: Annotated[str | None, typer.Option(help="Only this GranteePrincipal.")] = None,
    limit: LimitOpt = None,
    marker: MarkerOpt = None,
    as_of: AsOfOpt = None,
    at_seq: AtSeqOpt = None,
) -> None:
    """ListGrants of one key (with --as-of/--at-seq, replayed from the log):
    one ``grant-id  grantee  operations`` line per grant."""
    from ledger.pagination import paginate
    from projections.catalog import list_grants_at

    cli = ctx_of(ctx)
    ledger = cli.ledger_without_hsm
    state = point_in_time(cli, as_of, at_seq)
    if state is None:
        resp = ledger.list_grants(
            caller=cli.caller,
            key_id=key,
            limit=limit,
            marker=marker,
            grant_id=grant_id,
            grantee_principal=grantee,
        )
    else:

        def answer() -> dict[str, Any]:
            key_uuid = ledger.resolve_key_id(key)
            arn = cli.settings.key_arn(str(key_uuid))
            rows = [
                g
                for g in list_grants_at(state, key_uuid, arn)["Grants"]
                if (grant_id is None or g["GrantId"] == grant_id)
                and (grantee is None or g["GranteePrincipal"] == grantee)
            ]
            page, fields = paginate(rows, limit=limit, marker=marker)
            return {"Grants": page, **fields}

        if cli.as_principal:  # the principal must be allowed ListGrants on the key now
            request = {"keyId": key, "grantId": grant_id, "granteePrincipal": grantee,
                       "limit": limit, "marker": marker}  # fmt: skip
            resp = ledger.run_read(
                caller=cli.caller, operation="ListGrants", request=request,
                answer=answer, listing=False, key_id=key,
            )  # fmt: skip
        else:
            resp = answer()
    emit_list(cli, resp, "Grants", _grant_line)


@grants_app.command("list-retirable")
def grants_list_retirable(
    ctx: typer.Context,
    retiring: Annotated[str, typer.Option(help="RetiringPrincipal.")],
    limit: LimitOpt = None,
    marker: MarkerOpt = None,
) -> None:
    """ListRetirableGrants across all keys, from the catalog."""
    cli = ctx_of(ctx)
    request = {"retiringPrincipal": retiring, "limit": limit, "marker": marker}

    def answer() -> dict[str, Any]:
        return cli.catalog.list_retirable_grants(
            retiring_principal=retiring, limit=limit, marker=marker
        )

    if cli.as_principal:  # a principal's listing is authorized and recorded
        resp = cli.ledger_without_hsm.run_read(
            caller=cli.caller, operation="ListRetirableGrants", request=request, answer=answer
        )
    else:
        with recorded_failure(cli, "ListRetirableGrants", request):
            resp = answer()
    emit_list(cli, resp, "Grants", lambda g: f"{g['KeyId']}  {_grant_line(g)}")


@grants_app.command("retire")
def grants_retire(
    ctx: typer.Context,
    token: Annotated[str | None, typer.Option(help="GrantToken.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Key ARN (with --grant-id).")] = None,
    grant_id: Annotated[str | None, typer.Option(help="GrantId (with --key).")] = None,
) -> None:
    """RetireGrant, by --token or by --key and --grant-id."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.retire_grant(
        caller=cli.caller, grant_token=token, key_id=key, grant_id=grant_id
    )
    emit(cli, resp, "retired")


@grants_app.command("revoke")
def grants_revoke(
    ctx: typer.Context,
    key: KeyOpt,
    grant_id: Annotated[str, typer.Option(help="GrantId.")],
) -> None:
    """RevokeGrant."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.revoke_grant(caller=cli.caller, key_id=key, grant_id=grant_id)
    emit(cli, resp, f"revoked {grant_id}")
