"""``keyledger principals ...``: users and roles that sign API requests (SigV4), and their
identity policies. Creating, disabling and deleting principals are ledger events."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import AsOfOpt, AtSeqOpt, ctx_of, emit, point_in_time

principals_app = typer.Typer(
    help="Create, disable, delete principals; attach identity policies.", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(help="Principal name (user or role).")]
AccountOpt = Annotated[
    str | None, typer.Option("--account", help="12-digit account id (default: this ledger's).")
]


@principals_app.command("create")
def principals_create(
    ctx: typer.Context,
    name: NameArg,
    account: AccountOpt = None,
    principal_type: Annotated[str, typer.Option("--type", help="user or role.")] = "user",
) -> None:
    """Create a principal; prints its access key id and secret ONCE (not stored in clear)."""
    cli = ctx_of(ctx)
    resp = cli.ledger.create_principal(
        caller=cli.admin_caller(account), name=name, account=account or cli.settings.account_id,
        principal_type=principal_type,
    )  # fmt: skip
    emit(
        cli,
        resp,
        f"{resp['Principal']['Arn']}\n"
        f"AccessKeyId: {resp['AccessKeyId']}\n"
        f"SecretAccessKey: {resp['SecretAccessKey']}\n"
        "(the secret is shown only now)",
    )


@principals_app.command("list")
def principals_list(
    ctx: typer.Context,
    account: AccountOpt = None,
    as_of: AsOfOpt = None,
    at_seq: AtSeqOpt = None,
) -> None:
    """Live principals, optionally of one account; with --as-of/--at-seq, as they were
    then (replayed from the log)."""
    cli = ctx_of(ctx)
    state = point_in_time(cli, as_of, at_seq)
    if state is not None:
        from projections.catalog import principals_at

        rows = principals_at(state, account)
    else:
        rows = cli.ledger_without_hsm.list_principals(account=account)
    if cli.json_output:
        emit(cli, {"Principals": rows}, "")
        return
    for r in rows:
        enabled = "enabled" if r["Enabled"] else "disabled"
        typer.echo(f"{r['Arn']}  {enabled}  policies={','.join(r['Policies']) or '-'}")


@principals_app.command("describe")
def principals_describe(
    ctx: typer.Context,
    name: NameArg,
    account: AccountOpt = None,
    as_of: AsOfOpt = None,
    at_seq: AtSeqOpt = None,
) -> None:
    """A principal with its access key ids and identity policies; with
    --as-of/--at-seq, as it was then (replayed from the log)."""
    cli = ctx_of(ctx)
    acct = account or cli.settings.account_id
    state = point_in_time(cli, as_of, at_seq)
    if state is not None:
        from projections.catalog import describe_principal_at

        doc = describe_principal_at(state, name, acct)
    else:
        doc = cli.ledger_without_hsm.describe_principal(name=name, account=acct)
    emit(cli, doc, "\n".join(f"{k}: {v}" for k, v in doc.items() if k != "PolicyDocuments"))


def _set_enabled(ctx: typer.Context, name: str, account: str | None, enabled: bool) -> None:
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.set_principal_enabled(
        caller=cli.admin_caller(account), name=name, enabled=enabled, account=account
    )
    emit(cli, resp, f"{'enabled' if enabled else 'disabled'} {name}")


@principals_app.command("disable")
def principals_disable(ctx: typer.Context, name: NameArg, account: AccountOpt = None) -> None:
    """Disable: its access keys stop authenticating, its calls are refused."""
    _set_enabled(ctx, name, account, False)


@principals_app.command("enable")
def principals_enable(ctx: typer.Context, name: NameArg, account: AccountOpt = None) -> None:
    """Enable a disabled principal."""
    _set_enabled(ctx, name, account, True)


@principals_app.command("delete")
def principals_delete(ctx: typer.Context, name: NameArg, account: AccountOpt = None) -> None:
    """Delete a principal for good (the name cannot be reused)."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.delete_principal(
        caller=cli.admin_caller(account), name=name, account=account
    )
    emit(cli, resp, f"deleted {name}")


@principals_app.command("attach-policy")
def principals_attach_policy(
    ctx: typer.Context,
    name: NameArg,
    policy_name: Annotated[str, typer.Option("--policy-name", help="Name of the policy.")],
    policy_file: Annotated[
        str, typer.Option("--policy", help="Identity policy JSON file, or - for stdin.")
    ],
    account: AccountOpt = None,
) -> None:
    """Attach (or replace) an identity policy, evaluated when a key policy allows the
    account root (the default key policy does)."""
    cli = ctx_of(ctx)
    text = sys.stdin.read() if policy_file == "-" else Path(policy_file).read_text()
    resp = cli.ledger_without_hsm.attach_principal_policy(
        caller=cli.admin_caller(account), name=name, policy_name=policy_name, policy=text,
        account=account,
    )  # fmt: skip
    emit(cli, resp, f"attached {policy_name} to {name}")


@principals_app.command("detach-policy")
def principals_detach_policy(
    ctx: typer.Context,
    name: NameArg,
    policy_name: Annotated[str, typer.Option("--policy-name", help="Name of the policy.")],
    account: AccountOpt = None,
) -> None:
    """Detach an identity policy."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.detach_principal_policy(
        caller=cli.admin_caller(account), name=name, policy_name=policy_name, account=account
    )
    emit(cli, resp, f"detached {policy_name} from {name}")
