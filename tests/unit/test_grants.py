"""Grant logic: CreateGrant validation, ids and tokens, coverage, retirement, idempotency."""

from __future__ import annotations

import string
from dataclasses import replace
from typing import Any
from uuid import UUID

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ledger.domain import grants
from ledger.domain.grants import (
    GRANT_OPERATIONS,
    Constraints,
    GrantSpec,
    can_retire,
    constraints_at_least_as_strict,
    grant_allows,
    make_grant_token,
    new_grant_id,
    parse_grant_token,
    token_digest,
    validate_create_grant,
    verify_token_secret,
)
from ledger.errors import (
    AWS_ERROR_NAMES,
    InvalidGrantIdError,
    InvalidGrantTokenError,
    ValidationError,
)

KEY_ID = UUID("1234abcd-12ab-34cd-56ef-1234567890ab")
KEY_ARN = f"arn:aws:kms:us-east-2:111122223333:key/{KEY_ID}"
ACCOUNT = "arn:aws:iam::111122223333:root"
ALICE = "arn:aws:iam::111122223333:role/alice"
BOB = "arn:aws:iam::111122223333:role/bob"
CAROL = "arn:aws:iam::444455556666:user/carol"
GRANT_ID = "0123456789abcdef" * 4
SECRET = bytes(range(32))


def create(**overrides: Any) -> GrantSpec:
    args: dict[str, Any] = {
        "key_arn": KEY_ARN,
        "key_spec": "SYMMETRIC_DEFAULT",
        "key_usage": "ENCRYPT_DECRYPT",
        "issuing_account": ACCOUNT,
        "grantee_principal": ALICE,
        "operations": ["Decrypt", "Encrypt"],
    }
    args.update(overrides)
    return validate_create_grant(**args)


def error_of(**overrides: Any) -> str:
    with pytest.raises(ValidationError) as info:
        create(**overrides)
    return info.value.message


# ----------------------------------------------------------------------- validation


def test_create_grant_sorts_and_deduplicates_operations() -> None:
    spec = create(operations=["Encrypt", "Decrypt", "Encrypt", "DescribeKey"])
    assert spec.operations == ("Decrypt", "DescribeKey", "Encrypt")


def test_create_grant_rejects_an_empty_operation_list() -> None:
    assert error_of(operations=[]) == (
        "1 validation error detected: Value '[]' at 'operations' failed to satisfy "
        "constraint: Member must have length greater than or equal to 1"
    )


def test_create_grant_rejects_an_unknown_operation_with_the_enum_set() -> None:
    message = error_of(operations=["Decrypt", "Frobnicate"])
    assert message == (
        "1 validation error detected: Value '[Decrypt, Frobnicate]' at 'operations' failed "
        "to satisfy constraint: Member must satisfy constraint: [Member must satisfy enum "
        "value set: [" + ", ".join(GRANT_OPERATIONS) + "]]"
    )


def test_create_grant_counts_every_shape_error() -> None:
    message = error_of(grantee_principal="", name="bad name", operations=["Nope"])
    assert message.startswith("3 validation errors detected: ")
    assert "at 'granteePrincipal'" in message
    assert "at 'name'" in message
    assert "at 'operations'" in message


@pytest.mark.parametrize(
    ("name", "constraint"),
    [
        ("", "Member must have length greater than or equal to 1"),
        ("a" * 257, "Member must have length less than or equal to 256"),
        ("has space", "Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$"),
        ("café", "Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$"),
    ],
)
def test_create_grant_rejects_an_invalid_name(name: str, constraint: str) -> None:
    assert error_of(name=name) == (
        f"1 validation error detected: Value '{name}' at 'name' failed to satisfy "
        f"constraint: {constraint}"
    )


def test_create_grant_accepts_a_name_of_256_allowed_characters() -> None:
    name = ("aZ09:/_-" * 32)[:256]
    assert create(name=name).name == name


@pytest.mark.parametrize("field", ["grantee_principal", "retiring_principal"])
def test_create_grant_rejects_a_principal_longer_than_256(field: str) -> None:
    camel = "granteePrincipal" if field == "grantee_principal" else "retiringPrincipal"
    message = error_of(**{field: "a" * 257})
    assert f"at '{camel}' failed to satisfy constraint: Member must have length less " in message


def test_create_grant_rejects_a_principal_outside_the_pattern() -> None:
    message = error_of(retiring_principal="arn:aws:iam::1:role/a b")
    assert "Member must satisfy regular expression pattern: ^[\\w+=,.@:/-]+$" in message


def test_create_grant_rejects_a_grant_of_only_create_grant() -> None:
    assert error_of(operations=["CreateGrant"]) == (
        "Grants must not contain only the CreateGrant operation."
    )


@pytest.mark.parametrize("op", ["Sign", "Verify", "GetPublicKey", "GenerateMac", "VerifyMac"])
def test_create_grant_rejects_operations_a_symmetric_key_does_not_support(op: str) -> None:
    assert error_of(operations=["Decrypt", op]) == (
        f"Grant operations [{op}] are not valid for a KMS key with KeySpec "
        "SYMMETRIC_DEFAULT and KeyUsage ENCRYPT_DECRYPT."
    )


@pytest.mark.parametrize(
    ("key_spec", "key_usage", "ok", "bad"),
    [
        ("HMAC_256", "GENERATE_VERIFY_MAC", "GenerateMac", "Encrypt"),
        ("RSA_2048", "SIGN_VERIFY", "Sign", "Decrypt"),
        ("RSA_2048", "ENCRYPT_DECRYPT", "Decrypt", "GenerateDataKey"),
        ("ECC_NIST_P256", "KEY_AGREEMENT", "DeriveSharedSecret", "Sign"),
    ],
)
def test_create_grant_checks_operations_against_the_key_type(
    key_spec: str, key_usage: str, ok: str, bad: str
) -> None:
    spec = create(key_spec=key_spec, key_usage=key_usage, operations=[ok, "DescribeKey"])
    assert spec.operations == tuple(sorted([ok, "DescribeKey"]))
    with pytest.raises(ValidationError, match=f"Grant operations \\[{bad}\\] are not valid"):
        create(key_spec=key_spec, key_usage=key_usage, operations=[ok, bad])


def test_create_grant_rejects_both_constraint_kinds() -> None:
    message = error_of(
        constraints={"EncryptionContextSubset": {"a": "1"}, "EncryptionContextEquals": {"b": "2"}}
    )
    assert "not both" in message


def test_create_grant_treats_empty_constraint_maps_as_absent() -> None:
    assert create(constraints={"EncryptionContextSubset": {}}).constraints is None
    spec = create(
        constraints={"EncryptionContextSubset": {}, "EncryptionContextEquals": {"a": "1"}}
    )
    assert spec.constraints == Constraints(encryption_context_equals={"a": "1"})


def test_create_grant_rejects_constraints_on_an_asymmetric_key() -> None:
    message = error_of(
        key_spec="RSA_2048",
        key_usage="ENCRYPT_DECRYPT",
        constraints={"EncryptionContextSubset": {"a": "1"}},
    )
    assert message.startswith("Encryption context grant constraints are supported only")


def test_create_grant_limits_constraints_to_8_pairs_and_384_character_values() -> None:
    nine = {f"k{i}": "v" for i in range(9)}
    assert "at most 8" in error_of(constraints={"EncryptionContextEquals": nine})
    long = {"k": "v" * 385}
    assert "384" in error_of(constraints={"EncryptionContextSubset": long})
    assert create(constraints={"EncryptionContextSubset": {"k": "v" * 384}}).constraints


def test_create_grant_rejects_non_string_constraint_values() -> None:
    message = error_of(constraints={"EncryptionContextSubset": {"a": 1}})
    assert "constraints.encryptionContextSubset" in message


def test_grant_spec_json_round_trips_with_aws_field_names() -> None:
    spec = create(
        retiring_principal=BOB,
        name="my-grant",
        constraints={"EncryptionContextSubset": {"Dept": "IT"}},
    )
    data = spec.to_json()
    assert data == {
        "KeyId": KEY_ARN,
        "GranteePrincipal": ALICE,
        "RetiringPrincipal": BOB,
        "Operations": ["Decrypt", "Encrypt"],
        "Constraints": {"EncryptionContextSubset": {"Dept": "IT"}},
        "Name": "my-grant",
        "IssuingAccount": ACCOUNT,
    }
    assert GrantSpec.from_json(data) == spec
    assert GrantSpec.from_json(create().to_json()) == create()
    assert hash(spec) == hash(GrantSpec.from_json(data))


# -------------------------------------------------------------------- ids and tokens


@given(st.binary(min_size=32, max_size=32))
def test_grant_ids_are_64_lowercase_hex_characters(random32: bytes) -> None:
    grant_id = new_grant_id(random32)
    assert len(grant_id) == 64
    assert set(grant_id) <= set("0123456789abcdef")
    assert grants.check_grant_id(grant_id) == grant_id


@pytest.mark.parametrize("bad", ["", "0" * 63, "A" * 64, "g" * 64, None, 5])
def test_malformed_grant_ids_are_invalid_grant_id_errors(bad: object) -> None:
    with pytest.raises(InvalidGrantIdError):
        grants.check_grant_id(bad)


uuids = st.builds(UUID, bytes=st.binary(min_size=16, max_size=16))
grant_ids = st.binary(min_size=32, max_size=32).map(new_grant_id)
secrets = st.binary(min_size=32, max_size=32)


@given(uuids, grant_ids, secrets)
def test_grant_token_round_trips_for_any_key_grant_and_secret(
    key_id: UUID, grant_id: str, secret: bytes
) -> None:
    token = make_grant_token(key_id, grant_id, secret)
    assert 1 <= len(token) <= 8192
    assert set(token) <= set(string.ascii_letters + string.digits + "-_")
    assert parse_grant_token(token) == (key_id, grant_id, secret)


@given(uuids, grant_ids, secrets, st.data())
def test_any_single_character_change_to_a_token_is_rejected_or_parses_differently(
    key_id: UUID, grant_id: str, secret: bytes, data: st.DataObject
) -> None:
    token = make_grant_token(key_id, grant_id, secret)
    i = data.draw(st.integers(0, len(token) - 1))
    ch = data.draw(st.characters(codec="utf-8"))
    assume(ch != token[i])
    tampered = token[:i] + ch + token[i + 1 :]
    try:
        parsed = parse_grant_token(tampered)
    except InvalidGrantTokenError:
        return
    assert parsed != (key_id, grant_id, secret)


@given(uuids, grant_ids, secrets, st.data())
def test_truncated_or_extended_tokens_are_rejected(
    key_id: UUID, grant_id: str, secret: bytes, data: st.DataObject
) -> None:
    token = make_grant_token(key_id, grant_id, secret)
    cut = data.draw(st.integers(0, len(token) - 1))
    with pytest.raises(InvalidGrantTokenError):
        parse_grant_token(token[:cut])
    extra = data.draw(st.text(alphabet=string.ascii_letters + "=_- \n", min_size=1))
    with pytest.raises(InvalidGrantTokenError):
        parse_grant_token(token + extra)


@pytest.mark.parametrize("bad", ["", "x" * 8193, "abc=", "a b", "é" * 108, None, b"token"])
def test_malformed_tokens_are_invalid_grant_token_errors(bad: object) -> None:
    with pytest.raises(InvalidGrantTokenError) as info:
        parse_grant_token(bad)
    assert info.value.message == "Invalid grant token."


def test_token_errors_never_echo_the_token() -> None:
    token = make_grant_token(KEY_ID, GRANT_ID, SECRET)
    with pytest.raises(InvalidGrantTokenError) as info:
        parse_grant_token(token[:-1] + "!")
    assert token[:20] not in str(info.value)


def test_token_digest_is_hex_sha256_and_verifies_only_the_right_secret() -> None:
    digest = token_digest(SECRET)
    assert digest == "630dcd2966c4336691125448bbb25b4ff412a49c732db2c8abc1b8581bd710dd"
    verify_token_secret(SECRET, ["00" * 32, digest])
    with pytest.raises(InvalidGrantTokenError):
        verify_token_secret(bytes(32), [digest])
    with pytest.raises(InvalidGrantTokenError):
        verify_token_secret(SECRET, [])


def test_make_grant_token_refuses_wrong_sized_inputs() -> None:
    with pytest.raises(ValueError):
        make_grant_token(KEY_ID, GRANT_ID, b"short")
    with pytest.raises(InvalidGrantIdError):
        make_grant_token(KEY_ID, "not-a-grant-id", SECRET)
    with pytest.raises(ValueError):
        new_grant_id(b"\x00" * 31)


def test_grant_errors_map_to_aws_names() -> None:
    assert AWS_ERROR_NAMES[InvalidGrantTokenError] == "InvalidGrantTokenException"
    assert AWS_ERROR_NAMES[InvalidGrantIdError] == "InvalidGrantIdException"


# ------------------------------------------------------------------------- coverage

keys = st.text(alphabet="abcXYZ", min_size=1, max_size=3)
values = st.text(alphabet="pqPQ", max_size=3)
contexts = st.dictionaries(keys, values, max_size=5)


def constrained(**constraints: dict[str, str]) -> GrantSpec:
    return replace(create(), constraints=Constraints(**constraints))


@given(contexts, contexts)
def test_subset_allows_exactly_requests_that_contain_every_pair(
    constraint: dict[str, str], extra: dict[str, str]
) -> None:
    grant = constrained(encryption_context_subset=constraint)
    request = {**extra, **constraint}
    assert grant_allows(grant, operation="Decrypt", principal=ALICE, encryption_context=request)
    for k in constraint:
        missing = {rk: rv for rk, rv in request.items() if rk.lower() != k.lower()}
        assert not grant_allows(
            grant, operation="Decrypt", principal=ALICE, encryption_context=missing
        )


@given(contexts, contexts)
def test_equals_allows_only_the_same_context(
    constraint: dict[str, str], request: dict[str, str]
) -> None:
    assume(constraint)
    grant = constrained(encryption_context_equals=constraint)
    assert grant_allows(grant, operation="Encrypt", principal=ALICE, encryption_context=constraint)
    expected = sorted((k.lower(), v) for k, v in request.items()) == sorted(
        (k.lower(), v) for k, v in constraint.items()
    )
    assert (
        grant_allows(grant, operation="Encrypt", principal=ALICE, encryption_context=request)
        == expected
    )


@given(contexts, keys, values)
def test_equals_rejects_any_extra_pair(constraint: dict[str, str], key: str, value: str) -> None:
    assume(constraint and key.lower() not in {k.lower() for k in constraint})
    grant = constrained(encryption_context_equals=constraint)
    request = {**constraint, key: value}
    assert not grant_allows(grant, operation="Decrypt", principal=ALICE, encryption_context=request)


def test_constraint_keys_ignore_case_but_values_do_not() -> None:
    subset = constrained(encryption_context_subset={"Department": "IT"})
    equals = constrained(encryption_context_equals={"Department": "IT"})
    for grant in (subset, equals):
        allow = {"operation": "Decrypt", "principal": ALICE}
        assert grant_allows(grant, **allow, encryption_context={"department": "IT"})
        assert not grant_allows(grant, **allow, encryption_context={"Department": "it"})


def test_a_constrained_grant_denies_a_request_without_context() -> None:
    grant = constrained(encryption_context_subset={"a": "1"})
    assert not grant_allows(grant, operation="Decrypt", principal=ALICE, encryption_context=None)


def test_constraints_do_not_apply_to_describe_key_retire_grant_or_create_grant() -> None:
    grant = replace(
        create(operations=["Decrypt", "DescribeKey", "RetireGrant", "CreateGrant"]),
        constraints=Constraints(encryption_context_equals={"a": "1"}),
    )
    for op in ("DescribeKey", "RetireGrant", "CreateGrant"):
        assert grant_allows(grant, operation=op, principal=ALICE, encryption_context=None)


def test_grant_allows_only_the_grantee_and_listed_operations() -> None:
    grant = create()
    assert grant_allows(grant, operation="Encrypt", principal=ALICE, encryption_context=None)
    assert not grant_allows(grant, operation="Encrypt", principal=BOB, encryption_context=None)
    assert not grant_allows(
        grant, operation="GenerateDataKey", principal=ALICE, encryption_context=None
    )
    assert not grant_allows(
        grant, operation="Encrypt", principal=ALICE.upper(), encryption_context=None
    )


def test_a_constrained_grant_denies_operations_without_an_encryption_context() -> None:
    grant = replace(
        create(key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC", operations=["GenerateMac"]),
        constraints=Constraints(encryption_context_subset={"a": "1"}),
    )
    assert not grant_allows(
        grant, operation="GenerateMac", principal=ALICE, encryption_context={"a": "1"}
    )


@given(contexts, contexts)
def test_a_child_grant_must_be_at_least_as_strict_as_its_parent(
    parent_ctx: dict[str, str], child_ctx: dict[str, str]
) -> None:
    """Whenever the check passes, every context the child allows the parent allows too."""
    assume(parent_ctx)
    for parent in (
        Constraints(encryption_context_subset=parent_ctx),
        Constraints(encryption_context_equals=parent_ctx),
    ):
        for child in (
            Constraints(encryption_context_subset={**child_ctx, **parent_ctx}),
            Constraints(encryption_context_equals={**child_ctx, **parent_ctx}),
            Constraints(encryption_context_subset=child_ctx),
            None,
        ):
            if not constraints_at_least_as_strict(parent, child):
                continue
            assert child is not None
            probe = child.encryption_context_equals or child.encryption_context_subset or {}
            assert grants.context_satisfies(parent, probe)
    assert constraints_at_least_as_strict(None, None)
    assert not constraints_at_least_as_strict(
        Constraints(encryption_context_subset=parent_ctx), None
    )


def test_subset_parent_accepts_a_child_that_adds_pairs() -> None:
    parent = Constraints(encryption_context_subset={"a": "1"})
    assert constraints_at_least_as_strict(
        parent, Constraints(encryption_context_subset={"A": "1", "b": "2"})
    )
    assert constraints_at_least_as_strict(
        parent, Constraints(encryption_context_equals={"a": "1", "b": "2"})
    )
    assert not constraints_at_least_as_strict(
        parent, Constraints(encryption_context_subset={"b": "2"})
    )
    equals = Constraints(encryption_context_equals={"a": "1"})
    assert not constraints_at_least_as_strict(
        equals, Constraints(encryption_context_subset={"a": "1"})
    )


# ----------------------------------------------------------------------- retirement


def test_the_retiring_principal_can_retire() -> None:
    grant = create(retiring_principal=BOB)
    assert can_retire(grant, BOB)


def test_the_grantee_can_retire_only_when_the_grant_includes_retire_grant() -> None:
    assert not can_retire(create(), ALICE)
    assert can_retire(create(operations=["Decrypt", "RetireGrant"]), ALICE)


def test_the_issuing_account_can_retire_and_strangers_cannot() -> None:
    grant = create(retiring_principal=BOB)
    assert can_retire(grant, ACCOUNT)
    assert not can_retire(grant, CAROL)
    assert not can_retire(grant, "arn:aws:iam::444455556666:root")


# ---------------------------------------------------------------------- idempotency


def test_a_named_retry_with_identical_parameters_is_the_same_grant() -> None:
    first = create(name="g1", operations=["Encrypt", "Decrypt"])
    retry = create(name="g1", operations=["Decrypt", "Encrypt", "Decrypt"])
    assert grants.same_grant(first, retry)
    assert grants.find_same_grant([(GRANT_ID, first)], retry) == GRANT_ID


@pytest.mark.parametrize(
    "change",
    [
        {"name": "g2"},
        {"operations": ["Decrypt"]},
        {"grantee_principal": BOB},
        {"retiring_principal": BOB},
        {"constraints": {"EncryptionContextSubset": {"a": "1"}}},
        {"issuing_account": "arn:aws:iam::444455556666:root"},
    ],
)
def test_a_named_retry_with_any_different_parameter_is_a_new_grant(
    change: dict[str, Any],
) -> None:
    first = create(name="g1")
    assert not grants.same_grant(first, create(**{"name": "g1", **change}))
    assert grants.find_same_grant([(GRANT_ID, first)], create(**{"name": "g1", **change})) is None


def test_unnamed_grants_are_never_the_same_grant() -> None:
    assert not grants.same_grant(create(), create())


def test_constraint_case_differences_make_a_different_grant() -> None:
    a = create(name="g", constraints={"EncryptionContextSubset": {"a": "1"}})
    b = create(name="g", constraints={"EncryptionContextSubset": {"A": "1"}})
    assert not grants.same_grant(a, b)


# ------------------------------------------------------------------------- listings


def test_list_grants_filters_by_grant_id_and_grantee() -> None:
    other_id = "f" * 64
    items = [(GRANT_ID, create()), (other_id, create(grantee_principal=BOB))]
    assert grants.list_grants(items) == items
    assert grants.list_grants(items, grant_id=other_id) == items[1:]
    assert grants.list_grants(items, grantee_principal=ALICE) == items[:1]
    with pytest.raises(InvalidGrantIdError):
        grants.list_grants(items, grant_id="nope")


def test_list_retirable_grants_matches_the_retiring_principal_exactly() -> None:
    items = [(GRANT_ID, create(retiring_principal=BOB)), ("f" * 64, create())]
    assert grants.list_retirable_grants(items, retiring_principal=BOB) == items[:1]
    assert grants.list_retirable_grants(items, retiring_principal=ALICE) == []
