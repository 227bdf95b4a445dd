"""``keyledger aliases ...``: CreateAlias, UpdateAlias, DeleteAlias, ListAliases."""

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
    point_in_time,
    recorded_failure,
)

aliases_app = typer.Typer(help="Create, retarget, delete and list aliases.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="Alias name, alias/...")]
TargetOpt = Annotated[str, typer.Option("--key", help="Target key id or ARN.")]


@aliases_app.command("create")
def aliases_create(ctx: typer.Context, name: NameArg, key: TargetOpt) -> None:
    """CreateAlias."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.create_alias(
        caller=cli.caller, alias_name=name, target_key_id=key
    )
    emit(cli, resp, f"{name} -> {key}")


@aliases_app.command("update")
def aliases_update(ctx: typer.Context, name: NameArg, key: TargetOpt) -> None:
    """UpdateAlias: point the alias at another key of the same spec and usage."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.update_alias(
        caller=cli.caller, alias_name=name, target_key_id=key
    )
    emit(cli, resp, f"{name} -> {key}")


@aliases_app.command("delete")
def aliases_delete(ctx: typer.Context, name: NameArg) -> None:
    """DeleteAlias."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.delete_alias(caller=cli.caller, alias_name=name)
    emit(cli, resp, f"deleted {name}")


@aliases_app.command("list")
def aliases_list(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Option("--key", help="Only aliases of this key.")] = None,
    limit: LimitOpt = None,
    marker: MarkerOpt = None,
    as_of: AsOfOpt = None,
    at_seq: AtSeqOpt = None,
) -> None:
    """ListAliases from the catalog (with --as-of/--at-seq, replayed from the log):
    one ``name  target-key-id`` line per alias."""
    from ledger.pagination import paginate
    from projections.catalog import list_aliases_at

    cli = ctx_of(ctx)
    request = {"keyId": key, "limit": limit, "marker": marker}

    def answer() -> dict[str, Any]:
        state = point_in_time(cli, as_of, at_seq)
        key_uuid = cli.ledger_without_hsm.resolve_key_id(key) if key is not None else None
        if state is None:
            if key_uuid is not None:
                cli.ledger_without_hsm.load_key(key_uuid)  # NotFoundError, as AWS answers
            return cli.catalog.list_aliases(key_uuid=key_uuid, limit=limit, marker=marker)
        rows = list_aliases_at(state, key_uuid)["Aliases"]
        page, fields = paginate(rows, limit=limit, marker=marker)
        return {"Aliases": page, **fields}

    if cli.as_principal:  # a principal's listing is authorized and recorded
        resp = cli.ledger_without_hsm.run_read(
            caller=cli.caller, operation="ListAliases", request=request, answer=answer, key_id=key
        )
    else:
        with recorded_failure(cli, "ListAliases", request):
            resp = answer()
    emit_list(cli, resp, "Aliases", lambda a: f"{a['AliasName']}  {a['TargetKeyId']}")
