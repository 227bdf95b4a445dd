"""``keyledger keys ...``: key lifecycle, metadata, tags, rotation, deletion, policy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import (
    AsOfOpt,
    AtSeqOpt,
    KeyArg,
    LimitOpt,
    MarkerOpt,
    ctx_of,
    emit,
    emit_list,
    fmt_time,
    parse_time,
    point_in_time,
    read_text_file,
    recorded_failure,
)
from ledger.errors import NotFoundError, ValidationError

if TYPE_CHECKING:
    from uuid import UUID

    from cli.context import CliContext
    from projections.state import LedgerState

keys_app = typer.Typer(
    help="Create, describe, tag, rotate, delete keys and manage their policy.",
    no_args_is_help=True,
)
rotation_app = typer.Typer(help="Automatic and on-demand key rotation.", no_args_is_help=True)
policy_app = typer.Typer(help="The key policy (stored and versioned).", no_args_is_help=True)
keys_app.add_typer(rotation_app, name="rotation")
keys_app.add_typer(policy_app, name="policy")

BypassOpt = Annotated[
    bool,
    typer.Option(
        "--bypass-policy-lockout-safety-check", help="AWS BypassPolicyLockoutSafetyCheck."
    ),
]


def parse_tags(pairs: list[str] | None) -> list[dict[str, str]]:
    """``k=v`` entries to AWS Tags (the service checks keys, values and duplicates)."""
    tags = []
    for pair in pairs or []:
        k, sep, v = pair.partition("=")
        if not sep:
            raise ValidationError("Tags must be given as key=value.")
        tags.append({"TagKey": k, "TagValue": v})
    return tags


def _tags_or_record(
    cli: CliContext, operation: str, request: dict[str, Any], pairs: list[str]
) -> list[dict[str, str]]:
    """Parsed tags; a malformed entry is recorded as a failed ``operation``, then raised."""
    try:
        return parse_tags(pairs)
    except ValidationError as err:
        cli.ledger_without_hsm.record_rejected(
            operation=operation, caller=cli.caller, request=request, error=err
        )
        raise


def resolve_key_at(cli: CliContext, state: LedgerState | None, key: str) -> UUID:
    """Key id, ARN, alias name or alias ARN to the key UUID, now or as of ``state``."""
    from uuid import UUID

    ledger = cli.ledger_without_hsm
    is_alias = key.startswith("alias/") or (key.startswith("arn:") and ":alias/" in key)
    if state is None or not is_alias:
        return ledger.resolve_key_id(key, allow_alias=True)
    arn = ledger.alias_arn_of(key)
    for doc in state.aliases.values():
        if doc["arn"] == arn and doc["target"] is not None:
            return UUID(doc["target"])
    raise NotFoundError(f"Alias {arn} is not found.")


# ---------------------------------------------------------------- lifecycle


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    description: Annotated[str, typer.Option(help="Key description.")] = "",
    key_spec: Annotated[str, typer.Option(help="AWS KeySpec.")] = "SYMMETRIC_DEFAULT",
    key_usage: Annotated[
        str | None,
        typer.Option(help="AWS KeyUsage (required for all but SYMMETRIC_DEFAULT keys)."),
    ] = None,
    origin: Annotated[
        str, typer.Option(help="AWS_KMS (material made in the HSM) or EXTERNAL.")
    ] = "AWS_KMS",
    policy_file: Annotated[
        str | None, typer.Option("--policy-file", help="Key policy JSON file (- for stdin).")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag key=value.")] = None,
    bypass: BypassOpt = False,
) -> None:
    """CreateKey: prints the key ARN."""
    cli = ctx_of(ctx)
    tags = _tags_or_record(cli, "CreateKey", {"description": description}, tag or [])
    policy = read_text_file(policy_file) if policy_file is not None else None
    resp = cli.ledger.create_key(
        caller=cli.caller,
        description=description,
        key_spec=key_spec,
        key_usage=key_usage,
        origin=origin,
        policy=policy,
        tags=tags or None,
        bypass_policy_lockout_safety_check=bypass,
    )
    emit(cli, resp, resp["KeyMetadata"]["Arn"])


@keys_app.command("list")
def keys_list(ctx: typer.Context, limit: LimitOpt = None, marker: MarkerOpt = None) -> None:
    """ListKeys, from the key catalog projection."""
    cli = ctx_of(ctx)
    request = {"limit": limit, "marker": marker}
    if cli.as_principal:  # a principal's listing is authorized and recorded
        resp = cli.ledger_without_hsm.run_read(
            caller=cli.caller, operation="ListKeys", request=request,
            answer=lambda: cli.catalog.list_keys(limit=limit, marker=marker),
        )  # fmt: skip
    else:
        with recorded_failure(cli, "ListKeys", request):
            resp = cli.catalog.list_keys(limit=limit, marker=marker)
    emit_list(cli, resp, "Keys", lambda k: k["KeyArn"])


@keys_app.command("describe")
def keys_describe(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key id, key ARN, alias name or alias ARN.")],
    as_of: AsOfOpt = None,
    at_seq: AtSeqOpt = None,
) -> None:
    """DescribeKey from the catalog; with --as-of/--at-seq, replayed from the log."""
    from projections.catalog import describe_key_at

    cli = ctx_of(ctx)
    if cli.as_principal and as_of is None and at_seq is None:
        # A principal's DescribeKey goes through the service: authorized and recorded.
        resp = cli.ledger_without_hsm.describe_key(caller=cli.caller, key_id=key)
        md = resp["KeyMetadata"]
        emit(cli, resp, f"{md['Arn']}  {md['KeyState']}  {md['KeySpec']}  {md['KeyUsage']}  "
                        f"{md['Description']!r}")  # fmt: skip
        return

    def answer() -> dict[str, Any]:
        state = point_in_time(cli, as_of, at_seq)
        key_uuid = resolve_key_at(cli, state, key)
        arn = cli.settings.key_arn(str(key_uuid))
        if state is None:
            return cli.catalog.describe_key(key_uuid, arn)
        return describe_key_at(state, key_uuid, arn)

    if cli.as_principal:  # point in time: authorized on the key as it is now, and recorded
        resp = cli.ledger_without_hsm.run_read(
            caller=cli.caller, operation="DescribeKey", request={"keyId": key},
            answer=answer, listing=False, key_id=key,
        )  # fmt: skip
    else:
        with recorded_failure(cli, "DescribeKey", {"keyId": key}):
            resp = answer()
    md = resp["KeyMetadata"]
    emit(
        cli,
        resp,
        f"{md['Arn']}  {md['KeyState']}  {md['KeySpec']}  {md['KeyUsage']}  {md['Description']!r}",
    )


@keys_app.command("enable")
def keys_enable(ctx: typer.Context, key: KeyArg) -> None:
    """EnableKey."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.enable_key(caller=cli.caller, key_id=key)
    emit(cli, resp, f"enabled {key}")


@keys_app.command("disable")
def keys_disable(ctx: typer.Context, key: KeyArg) -> None:
    """DisableKey."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.disable_key(caller=cli.caller, key_id=key)
    emit(cli, resp, f"disabled {key}")


@keys_app.command("update-description")
def keys_update_description(
    ctx: typer.Context,
    key: KeyArg,
    description: Annotated[str, typer.Option(help="The new description.")],
) -> None:
    """UpdateKeyDescription."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.update_key_description(
        caller=cli.caller, key_id=key, description=description
    )
    emit(cli, resp, f"updated description of {key}")


@keys_app.command("schedule-deletion")
def keys_schedule_deletion(
    ctx: typer.Context,
    key: KeyArg,
    days: Annotated[int, typer.Option(help="PendingWindowInDays (7-30).")] = 30,
) -> None:
    """ScheduleKeyDeletion: the key turns PendingDeletion; `maintenance run` deletes it."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.schedule_key_deletion(
        caller=cli.caller, key_id=key, pending_window_in_days=days
    )
    emit(cli, resp, f"{resp['KeyId']}  {resp['KeyState']}  until {fmt_time(resp['DeletionDate'])}")


@keys_app.command("cancel-deletion")
def keys_cancel_deletion(ctx: typer.Context, key: KeyArg) -> None:
    """CancelKeyDeletion: the key returns to Disabled."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.cancel_key_deletion(caller=cli.caller, key_id=key)
    emit(cli, resp, f"{resp['KeyId']}  Disabled (deletion cancelled)")


# ---------------------------------------------------------------- tags


@keys_app.command("tag")
def keys_tag(
    ctx: typer.Context,
    key: KeyArg,
    tags: Annotated[list[str], typer.Argument(help="Tags as key=value (adds or overwrites).")],
) -> None:
    """TagResource."""
    cli = ctx_of(ctx)
    parsed = _tags_or_record(cli, "TagResource", {"keyId": key}, tags)
    resp = cli.ledger_without_hsm.tag_resource(caller=cli.caller, key_id=key, tags=parsed)
    emit(cli, resp, f"tagged {key}")


@keys_app.command("untag")
def keys_untag(
    ctx: typer.Context,
    key: KeyArg,
    tag_keys: Annotated[list[str], typer.Argument(help="Tag keys to remove.")],
) -> None:
    """UntagResource (unknown tag keys are ignored, as AWS does)."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.untag_resource(caller=cli.caller, key_id=key, tag_keys=tag_keys)
    emit(cli, resp, f"untagged {key}")


@keys_app.command("tags")
def keys_tags(
    ctx: typer.Context, key: KeyArg, limit: LimitOpt = None, marker: MarkerOpt = None
) -> None:
    """ListResourceTags: one key=value line per tag."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.list_resource_tags(
        caller=cli.caller, key_id=key, limit=limit, marker=marker
    )
    emit_list(cli, resp, "Tags", lambda t: f"{t['TagKey']}={t['TagValue']}")


# ---------------------------------------------------------------- rotation


@rotation_app.command("enable")
def rotation_enable(
    ctx: typer.Context,
    key: KeyArg,
    period_days: Annotated[
        int | None, typer.Option(help="RotationPeriodInDays (90-2560, default 365).")
    ] = None,
) -> None:
    """EnableKeyRotation."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.enable_key_rotation(
        caller=cli.caller, key_id=key, rotation_period_in_days=period_days
    )
    emit(cli, resp, f"rotation enabled for {key}")


@rotation_app.command("disable")
def rotation_disable(ctx: typer.Context, key: KeyArg) -> None:
    """DisableKeyRotation."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.disable_key_rotation(caller=cli.caller, key_id=key)
    emit(cli, resp, f"rotation disabled for {key}")


@rotation_app.command("status")
def rotation_status(ctx: typer.Context, key: KeyArg) -> None:
    """GetKeyRotationStatus."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.get_key_rotation_status(caller=cli.caller, key_id=key)
    if resp["KeyRotationEnabled"]:
        text = (
            f"enabled  every {resp['RotationPeriodInDays']} days  "
            f"next {fmt_time(resp['NextRotationDate'])}"
        )
    else:
        text = "disabled"
    emit(cli, resp, text)


@rotation_app.command("list")
def rotation_list(
    ctx: typer.Context, key: KeyArg, limit: LimitOpt = None, marker: MarkerOpt = None
) -> None:
    """ListKeyRotations: one line per rotation, oldest first."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.list_key_rotations(
        caller=cli.caller, key_id=key, limit=limit, marker=marker
    )
    emit_list(
        cli,
        resp,
        "Rotations",
        lambda r: f"{fmt_time(r['RotationDate'])}  {r['RotationType']}  {r['KeyMaterialId']}",
    )


@keys_app.command("rotate")
def keys_rotate(ctx: typer.Context, key: KeyArg) -> None:
    """RotateKeyOnDemand: new key material generated in the HSM now."""
    cli = ctx_of(ctx)
    resp = cli.ledger.rotate_key_on_demand(caller=cli.caller, key_id=key)
    emit(cli, resp, f"rotated {resp['KeyId']}")


# ---------------------------------------------------------------- policy


@policy_app.command("get")
def policy_get(
    ctx: typer.Context, key: KeyArg, as_of: AsOfOpt = None, at_seq: AtSeqOpt = None
) -> None:
    """GetKeyPolicy (the default policy); with --as-of/--at-seq, replayed from the log."""
    from projections.catalog import get_key_policy_at

    cli = ctx_of(ctx)
    state = point_in_time(cli, as_of, at_seq)
    if state is None:
        resp = cli.ledger_without_hsm.get_key_policy(caller=cli.caller, key_id=key)
    else:

        def answer() -> dict[str, Any]:
            key_uuid = cli.ledger_without_hsm.resolve_key_id(key)
            return get_key_policy_at(state, key_uuid, cli.settings.key_arn(str(key_uuid)))

        if cli.as_principal:  # the principal must be allowed GetKeyPolicy on the key now
            resp = cli.ledger_without_hsm.run_read(
                caller=cli.caller, operation="GetKeyPolicy",
                request={"keyId": key, "policyName": "default"},
                answer=answer, listing=False, key_id=key,
            )  # fmt: skip
        else:
            resp = answer()
    emit(cli, resp, resp["Policy"])


@policy_app.command("put")
def policy_put(
    ctx: typer.Context,
    key: KeyArg,
    file: Annotated[str, typer.Option("--file", help="Policy JSON file (- for stdin).")],
    bypass: BypassOpt = False,
) -> None:
    """PutKeyPolicy."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.put_key_policy(
        caller=cli.caller,
        key_id=key,
        policy=read_text_file(file),
        bypass_policy_lockout_safety_check=bypass,
    )
    emit(cli, resp, f"put policy default on {key}")


@policy_app.command("list")
def policy_list(
    ctx: typer.Context, key: KeyArg, limit: LimitOpt = None, marker: MarkerOpt = None
) -> None:
    """ListKeyPolicies (always "default")."""
    cli = ctx_of(ctx)
    resp = cli.ledger_without_hsm.list_key_policies(
        caller=cli.caller, key_id=key, limit=limit, marker=marker
    )
    emit_list(cli, resp, "PolicyNames", str)


# ---------------------------------------------------------------- imported key material


@keys_app.command("import-params")
def keys_import_params(
    ctx: typer.Context,
    key: KeyArg,
    wrapping_algorithm: Annotated[
        str, typer.Option("--wrapping-algorithm", help="e.g. RSAES_OAEP_SHA_256.")
    ],
    wrapping_key_spec: Annotated[
        str, typer.Option("--wrapping-key-spec", help="RSA_2048, RSA_3072 or RSA_4096.")
    ],
    public_key_out: Annotated[
        str, typer.Option("--public-key-out", help="File for the DER wrapping public key.")
    ],
    token_out: Annotated[
        str, typer.Option("--token-out", help="File (mode 0600) for the raw import token.")
    ],
) -> None:
    """GetParametersForImport (EXTERNAL keys): writes the wrapping key and the import
    token, prints ParametersValidTo."""
    from pathlib import Path

    from cli.crypto_cmds import _output

    cli = ctx_of(ctx)
    resp = cli.ledger.get_parameters_for_import(
        caller=cli.caller,
        key_id=key,
        wrapping_algorithm=wrapping_algorithm,
        wrapping_key_spec=wrapping_key_spec,
    )
    Path(public_key_out).write_bytes(resp["PublicKey"])
    with _output(token_out) as f:
        f.write(resp["ImportToken"])
    emit(cli, resp, fmt_time(resp["ParametersValidTo"]))


@keys_app.command("import")
def keys_import(
    ctx: typer.Context,
    key: KeyArg,
    token: Annotated[str, typer.Option("--token", help="Import token file from import-params.")],
    material: Annotated[
        str, typer.Option("--material", help="Key material file, wrapped with the public key.")
    ],
    valid_to: Annotated[
        str | None,
        typer.Option("--valid-to", help="RFC 3339 expiry (KEY_MATERIAL_EXPIRES); none: never."),
    ] = None,
) -> None:
    """ImportKeyMaterial: the key becomes Enabled."""
    from pathlib import Path

    cli = ctx_of(ctx)
    try:
        expires = parse_time(valid_to, "--valid-to") if valid_to is not None else None
    except ValidationError as err:
        cli.ledger_without_hsm.record_rejected(
            operation="ImportKeyMaterial", caller=cli.caller, request={"keyId": key}, error=err
        )
        raise
    resp = cli.ledger.import_key_material(
        caller=cli.caller,
        key_id=key,
        import_token=Path(token).read_bytes(),
        encrypted_key_material=Path(material).read_bytes(),
        valid_to=expires,
    )
    emit(cli, resp, f"imported {resp['KeyMaterialId']} into {resp['KeyId']}")


@keys_app.command("delete-imported")
def keys_delete_imported(ctx: typer.Context, key: KeyArg) -> None:
    """DeleteImportedKeyMaterial: the key returns to PendingImport."""
    cli = ctx_of(ctx)
    resp = cli.ledger.delete_imported_key_material(caller=cli.caller, key_id=key)
    emit(cli, resp, f"deleted imported key material of {resp['KeyId']} (PendingImport)")
