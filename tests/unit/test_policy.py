"""The IAM / KMS policy language: parsing, principals, actions, resources, conditions."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import AWS_ERROR_NAMES, MalformedPolicyDocumentError
from ledger.policy import (
    AuthzRequest,
    Evaluation,
    Policy,
    evaluate,
    parse_policy,
    policy_allows_put_key_policy,
)

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
BOB = f"arn:aws:iam::{ACCOUNT}:user/bob"
APP_ROLE = f"arn:aws:iam::{ACCOUNT}:role/app"
OTHER_ROOT = f"arn:aws:iam::{OTHER_ACCOUNT}:root"
CAROL = f"arn:aws:iam::{OTHER_ACCOUNT}:user/carol"
KEY_ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"

DEFAULT_KEY_POLICY = (
    '{"Version":"2012-10-17","Id":"key-default-1","Statement":[{"Sid":"Enable IAM User '
    'Permissions","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:root"},'
    '"Action":"kms:*","Resource":"*"}]}'
)

NOTHING = Evaluation(denied=False, allowed=False, account_allowed=False)
ALLOWED = Evaluation(denied=False, allowed=True, account_allowed=False)
ACCOUNT_ALLOWED = Evaluation(denied=False, allowed=False, account_allowed=True)


def statement(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "Effect": "Allow",
        "Principal": {"AWS": ALICE},
        "Action": "kms:*",
        "Resource": "*",
    }
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def key_policy(*statements: dict[str, Any], version: str | None = "2012-10-17") -> Policy:
    doc: dict[str, Any] = {"Statement": list(statements)}
    if version is not None:
        doc["Version"] = version
    return parse_policy(json.dumps(doc))


def request(
    principal: str = ALICE,
    *,
    action: str = "kms:Encrypt",
    resource: str = KEY_ARN,
    context: dict[str, object] | None = None,
    account: str | None = None,
) -> AuthzRequest:
    return AuthzRequest(
        principal_arn=principal,
        principal_account=account or principal.split(":")[4],
        action=action,
        resource=resource,
        context=context or {},
    )


def check(policy: Policy, principal: str = ALICE, **kwargs: Any) -> Evaluation:
    return evaluate(policy, request(principal, **kwargs))


def holds(condition: dict[str, Any], context: dict[str, object] | None = None) -> bool:
    """Does an Allow statement for Alice with this Condition block apply?"""
    policy = key_policy(statement(Condition=condition))
    return evaluate(policy, request(context=context)).allowed


def malformed_message(document: object) -> str:
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(MalformedPolicyDocumentError) as info:
        parse_policy(text)
    return info.value.message


# --------------------------------------------------------------------------- parsing


def test_malformed_policy_error_maps_to_the_aws_exception_name() -> None:
    assert AWS_ERROR_NAMES[MalformedPolicyDocumentError] == "MalformedPolicyDocumentException"


@pytest.mark.parametrize(
    "document",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param("", id="empty-text"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="too-deeply-nested"),
        pytest.param([statement()], id="array-document"),
        pytest.param({"Version": "2013-01-01", "Statement": [statement()]}, id="bad-version"),
        pytest.param({"Version": 2012, "Statement": [statement()]}, id="numeric-version"),
        pytest.param({"Version": "2012-10-17"}, id="no-statement"),
        pytest.param({"Statement": []}, id="empty-statement-list"),
        pytest.param({"Statement": "Allow"}, id="statement-string"),
        pytest.param({"Statement": ["Allow"]}, id="statement-not-object"),
        pytest.param({"Statement": [statement()], "Extra": 1}, id="unknown-top-element"),
        pytest.param({"Id": 7, "Statement": [statement()]}, id="non-string-id"),
        pytest.param({"Statement": [statement(Actions="kms:*")]}, id="unknown-element"),
        pytest.param({"Statement": [statement(Sid=3)]}, id="non-string-sid"),
        pytest.param({"Statement": [statement(Effect="allow")]}, id="effect-lower-case"),
        pytest.param({"Statement": [statement(Effect=None)]}, id="no-effect"),
        pytest.param({"Statement": [statement(NotAction="kms:Decrypt")]}, id="action-and-not"),
        pytest.param({"Statement": [statement(Action=None)]}, id="no-action"),
        pytest.param({"Statement": [statement(Action=[])]}, id="empty-action-list"),
        pytest.param({"Statement": [statement(Action=["kms:Encrypt", 3])]}, id="number-action"),
        pytest.param({"Statement": [statement(Action="Encrypt")]}, id="action-no-service"),
        pytest.param({"Statement": [statement(Action="")]}, id="empty-action"),
        pytest.param({"Statement": [statement(Resource="key/abc")]}, id="resource-not-arn"),
        pytest.param(
            {"Statement": [statement(NotResource="arn:aws:kms:*")]}, id="resource-and-not"
        ),
        pytest.param({"Statement": [statement(Principal=None)]}, id="no-principal"),
        pytest.param({"Statement": [statement(NotPrincipal={"AWS": BOB})]}, id="principal-and-not"),
        pytest.param({"Statement": [statement(Principal=ROOT)]}, id="bare-string-principal"),
        pytest.param({"Statement": [statement(Principal={})]}, id="empty-principal"),
        pytest.param({"Statement": [statement(Principal={"AWS": []})]}, id="empty-aws-list"),
        pytest.param({"Statement": [statement(Principal={"IAM": ALICE})]}, id="unknown-type"),
        pytest.param({"Statement": [statement(Principal={"AWS": "alice"})]}, id="name-only"),
        pytest.param(
            {"Statement": [statement(Principal={"AWS": f"arn:aws:iam::{ACCOUNT}:user/*"})]},
            id="wildcard-in-principal-arn",
        ),
        pytest.param(
            {"Statement": [statement(Principal={"AWS": "arn:aws:iam::1234:root"})]},
            id="short-account-id",
        ),
        pytest.param({"Statement": [statement(Condition="none")]}, id="condition-not-object"),
        pytest.param(
            {"Statement": [statement(Condition={"StringEqualz": {"k": "v"}})]},
            id="unknown-operator",
        ),
        pytest.param(
            {"Statement": [statement(Condition={"ForSomeValues:StringEquals": {"k": "v"}})]},
            id="unknown-set-qualifier",
        ),
        pytest.param(
            {"Statement": [statement(Condition={"NullIfExists": {"k": "true"}})]},
            id="null-if-exists",
        ),
        pytest.param(
            {"Statement": [statement(Condition={"ForAnyValue:Null": {"k": "true"}})]},
            id="qualified-null",
        ),
        pytest.param(
            {"Statement": [statement(Condition={"stringequals": {"k": "v"}})]},
            id="operator-wrong-case",
        ),
        pytest.param(
            {"Statement": [statement(Condition={"StringEquals": "k"})]}, id="operator-not-object"
        ),
        pytest.param(
            {"Statement": [statement(Condition={"StringEquals": {"k": None}})]}, id="null-value"
        ),
        pytest.param(
            {"Statement": [statement(Condition={"StringEquals": {"k": {"a": "b"}}})]},
            id="object-value",
        ),
        pytest.param(
            {"Statement": [statement(Condition={"StringEquals": {"k": []}})]}, id="no-values"
        ),
        pytest.param(
            {"Statement": [statement(Condition={"StringEquals": {"": "v"}})]}, id="empty-key"
        ),
        pytest.param(
            {"Statement": [statement(Condition={"NumericLessThan": {"k": "ten"}})]},
            id="bad-number",
        ),
        pytest.param(
            {"Statement": [statement(Condition={"DateLessThan": {"k": "yesterday"}})]},
            id="bad-date",
        ),
        pytest.param(
            {"Statement": [statement(Condition={"IpAddress": {"k": "10.0.0.300/24"}})]},
            id="bad-cidr",
        ),
        pytest.param(
            {"Statement": [statement(Condition={"BinaryEquals": {"k": "not base64!"}})]},
            id="bad-base64",
        ),
        pytest.param({"Statement": [statement(Condition={"Bool": {"k": "yes"}})]}, id="bad-bool"),
        pytest.param({"Statement": [statement(Condition={"Null": {"k": "maybe"}})]}, id="bad-null"),
        pytest.param(
            {"Statement": [statement(Sid="One"), statement(Sid="One", Action="kms:Decrypt")]},
            id="duplicate-sid",
        ),
        pytest.param(
            '{"Statement": [{"Effect": "Allow", "Effect": "Deny", "Principal": "*",'
            ' "Action": "kms:*"}]}',
            id="duplicate-json-key",
        ),
    ],
)
def test_malformed_documents_raise_malformed_policy_document_error(document: object) -> None:
    assert malformed_message(document)


def test_error_message_quotes_only_a_short_part_of_the_offending_token() -> None:
    operator_name = "StringEquals" + "x" * 10_000
    message = malformed_message({"Statement": [statement(Condition={operator_name: {"k": "v"}})]})
    assert len(message) < 150
    assert "StringEqualsxxx" in message


def test_error_message_does_not_echo_the_document() -> None:
    secret_looking = "do-not-echo-" + "z" * 200
    message = malformed_message({"Id": secret_looking, "Statement": [statement(Effect="Maybe")]})
    assert secret_looking not in message
    assert "Maybe" in message


def test_a_non_string_document_is_malformed() -> None:
    with pytest.raises(MalformedPolicyDocumentError):
        parse_policy(b"{}")  # type: ignore[arg-type]


def test_the_aws_default_key_policy_parses() -> None:
    policy = parse_policy(DEFAULT_KEY_POLICY)
    assert policy.version == "2012-10-17"
    assert policy.id == "key-default-1"
    assert [s.sid for s in policy.statements] == ["Enable IAM User Permissions"]
    assert policy.statements[0].effect == "Allow"


def test_a_single_statement_object_is_accepted() -> None:
    policy = parse_policy(json.dumps({"Statement": statement()}))
    assert len(policy.statements) == 1


@pytest.mark.parametrize("version", ["2012-10-17", "2008-10-17", None])
def test_both_policy_versions_and_a_missing_version_are_accepted(version: str | None) -> None:
    policy = key_policy(statement(), version=version)
    assert policy.version == (version or "2008-10-17")


def test_statements_without_sid_may_repeat() -> None:
    policy = key_policy(statement(), statement())
    assert len(policy.statements) == 2


def test_a_key_policy_statement_without_resource_matches_every_resource() -> None:
    policy = key_policy(statement(Resource=None))
    assert check(policy, resource="*") == ALLOWED
    assert check(policy, resource=KEY_ARN) == ALLOWED


def test_identity_policies_forbid_principal_and_require_resource() -> None:
    with pytest.raises(MalformedPolicyDocumentError):
        parse_policy(json.dumps({"Statement": [statement()]}), identity=True)
    with pytest.raises(MalformedPolicyDocumentError):
        parse_policy(
            json.dumps({"Statement": [statement(Principal=None, Resource=None)]}), identity=True
        )
    with pytest.raises(MalformedPolicyDocumentError):
        parse_policy(
            json.dumps({"Statement": [statement(Principal=None, NotPrincipal={"AWS": BOB})]}),
            identity=True,
        )


def test_an_identity_policy_applies_to_the_identity_it_is_attached_to() -> None:
    document = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "kms:*", "Resource": KEY_ARN},
            {"Effect": "Deny", "Action": "kms:ScheduleKeyDeletion", "Resource": "*"},
        ],
    }
    policy = parse_policy(json.dumps(document), identity=True)
    assert policy.identity
    assert evaluate(policy, request(CAROL)) == ALLOWED
    assert evaluate(policy, request(action="kms:ScheduleKeyDeletion")) == Evaluation(
        denied=True, allowed=True, account_allowed=False
    )
    assert evaluate(policy, request(resource="*")) == NOTHING


def test_a_parsed_policy_is_immutable() -> None:
    policy = parse_policy(DEFAULT_KEY_POLICY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.statements = ()  # type: ignore[misc]


def test_json_numbers_and_booleans_in_conditions_are_read_as_iam_does() -> None:
    assert holds({"NumericEquals": {"k": 10}}, {"k": "10"})
    assert holds({"StringEquals": {"k": 10}}, {"k": "10"})
    assert holds({"Bool": {"k": True}}, {"k": True})
    assert holds({"StringEquals": {"k": False}}, {"k": "false"})
    assert holds({"NumericLessThan": {"k": 1.5}}, {"k": 1})


# --------------------------------------------------------------------------- default policy


def test_default_key_policy_allows_a_user_of_the_account_only_through_the_account() -> None:
    policy = parse_policy(DEFAULT_KEY_POLICY)
    assert check(policy, ALICE) == ACCOUNT_ALLOWED
    assert check(policy, APP_ROLE, action="kms:Decrypt") == ACCOUNT_ALLOWED


def test_default_key_policy_allows_the_account_root_directly() -> None:
    assert check(parse_policy(DEFAULT_KEY_POLICY), ROOT) == ALLOWED


def test_default_key_policy_gives_another_account_nothing() -> None:
    policy = parse_policy(DEFAULT_KEY_POLICY)
    assert check(policy, CAROL) == NOTHING
    assert check(policy, OTHER_ROOT) == NOTHING


def test_default_key_policy_passes_the_lockout_check_for_account_principals() -> None:
    policy = parse_policy(DEFAULT_KEY_POLICY)
    assert policy_allows_put_key_policy(policy, ROOT, ACCOUNT, KEY_ARN)
    assert policy_allows_put_key_policy(policy, ALICE, ACCOUNT, KEY_ARN)
    assert not policy_allows_put_key_policy(policy, CAROL, OTHER_ACCOUNT, KEY_ARN)


def test_lockout_check_fails_when_the_principal_cannot_put_the_key_policy() -> None:
    policy = key_policy(statement(Action=["kms:Encrypt", "kms:Decrypt"]))
    assert not policy_allows_put_key_policy(policy, ALICE, ACCOUNT, KEY_ARN)


def test_lockout_check_fails_when_a_deny_applies() -> None:
    policy = key_policy(
        statement(Principal={"AWS": ROOT}),
        statement(Effect="Deny", Principal="*", Action="kms:PutKeyPolicy"),
    )
    assert not policy_allows_put_key_policy(policy, ROOT, ACCOUNT, KEY_ARN)


def test_lockout_check_uses_an_empty_condition_context() -> None:
    needs_context = statement(
        Action="kms:PutKeyPolicy",
        Condition={"StringEquals": {"aws:SourceVpc": "vpc-1"}},
    )
    assert not policy_allows_put_key_policy(key_policy(needs_context), ALICE, ACCOUNT, KEY_ARN)
    no_bypass = statement(
        Action="kms:PutKeyPolicy",
        Condition={"Null": {"kms:BypassPolicyLockoutSafetyCheck": "true"}},
    )
    assert policy_allows_put_key_policy(key_policy(no_bypass), ALICE, ACCOUNT, KEY_ARN)


def test_lockout_check_honours_wildcards_not_action_and_the_key_resource() -> None:
    assert policy_allows_put_key_policy(
        key_policy(statement(Action="kms:Put*")), ALICE, ACCOUNT, KEY_ARN
    )
    assert policy_allows_put_key_policy(
        key_policy(statement(Action=None, NotAction="kms:Encrypt")), ALICE, ACCOUNT, KEY_ARN
    )
    assert not policy_allows_put_key_policy(
        key_policy(statement(Resource=KEY_ARN + "-other")), ALICE, ACCOUNT, KEY_ARN
    )
    assert not policy_allows_put_key_policy(
        key_policy(statement(Principal={"AWS": BOB})), ALICE, ACCOUNT, KEY_ARN
    )


# --------------------------------------------------------------------------- principals


@pytest.mark.parametrize("principal", ["*", {"AWS": "*"}, {"AWS": ["*"]}])
def test_a_wildcard_principal_matches_everyone_directly(principal: object) -> None:
    policy = key_policy(statement(Principal=principal))
    for caller in (ALICE, ROOT, CAROL, OTHER_ROOT):
        assert check(policy, caller) == ALLOWED


def test_a_principal_arn_matches_only_that_principal() -> None:
    policy = key_policy(statement(Principal={"AWS": ALICE}))
    assert check(policy, ALICE) == ALLOWED
    assert check(policy, BOB) == NOTHING
    assert check(policy, ROOT) == NOTHING


def test_principal_arns_are_case_sensitive() -> None:
    policy = key_policy(statement(Principal={"AWS": f"arn:aws:iam::{ACCOUNT}:user/Alice"}))
    assert check(policy, ALICE) == NOTHING


def test_a_list_of_principals_matches_any_of_them() -> None:
    policy = key_policy(statement(Principal={"AWS": [CAROL, APP_ROLE]}))
    assert check(policy, CAROL) == ALLOWED
    assert check(policy, APP_ROLE) == ALLOWED
    assert check(policy, ALICE) == NOTHING


@pytest.mark.parametrize(
    "name", [ACCOUNT, ROOT, f"arn:aws-cn:iam::{ACCOUNT}:root"], ids=["bare-id", "root", "cn"]
)
def test_naming_the_account_allows_its_principals_through_the_account(name: str) -> None:
    policy = key_policy(statement(Principal={"AWS": name}))
    assert check(policy, ALICE) == ACCOUNT_ALLOWED
    assert check(policy, APP_ROLE) == ACCOUNT_ALLOWED
    assert check(policy, ROOT) == ALLOWED
    assert check(policy, CAROL) == NOTHING


def test_naming_another_account_gives_this_account_nothing() -> None:
    policy = key_policy(statement(Principal={"AWS": [OTHER_ROOT, OTHER_ACCOUNT]}))
    assert check(policy, ALICE) == NOTHING
    assert check(policy, ROOT) == NOTHING
    assert check(policy, CAROL) == ACCOUNT_ALLOWED


def test_naming_a_principal_and_its_account_counts_as_direct() -> None:
    policy = key_policy(statement(Principal={"AWS": [ALICE, ROOT]}))
    assert check(policy, ALICE) == ALLOWED
    assert check(policy, BOB) == ACCOUNT_ALLOWED


def test_a_direct_and_an_account_statement_set_both_flags() -> None:
    policy = key_policy(
        statement(Principal={"AWS": ROOT}), statement(Principal={"AWS": ALICE}, Sid="Alice")
    )
    assert check(policy, ALICE) == Evaluation(denied=False, allowed=True, account_allowed=True)


def test_a_service_principal_never_matches_a_caller() -> None:
    policy = key_policy(statement(Principal={"Service": ["ec2.amazonaws.com", "*"]}))
    assert check(policy, ALICE) == NOTHING
    assert check(policy, ROOT) == NOTHING
    mixed = key_policy(statement(Principal={"Service": "logs.amazonaws.com", "AWS": APP_ROLE}))
    assert check(mixed, APP_ROLE) == ALLOWED


def test_a_deny_naming_the_account_root_denies_every_principal_of_the_account() -> None:
    policy = key_policy(
        statement(Principal="*"),
        statement(Effect="Deny", Principal={"AWS": ROOT}, Action="kms:ScheduleKeyDeletion"),
    )
    for caller in (ALICE, APP_ROLE, ROOT):
        result = check(policy, caller, action="kms:ScheduleKeyDeletion")
        assert result == Evaluation(denied=True, allowed=True, account_allowed=False)
    assert not check(policy, CAROL, action="kms:ScheduleKeyDeletion").denied


def test_a_deny_naming_a_principal_denies_only_that_principal() -> None:
    policy = key_policy(statement(Effect="Deny", Principal={"AWS": ALICE}))
    assert check(policy, ALICE).denied
    assert check(policy, BOB) == NOTHING


def test_an_explicit_deny_is_reported_alongside_an_allow() -> None:
    policy = key_policy(
        statement(Sid="Allow"),
        statement(Sid="Deny", Effect="Deny", Principal="*", Action="kms:Decrypt"),
    )
    assert check(policy, action="kms:Decrypt") == Evaluation(
        denied=True, allowed=True, account_allowed=False
    )
    assert check(policy, action="kms:Encrypt") == ALLOWED


def test_not_principal_deny_needs_both_the_principal_and_its_account_listed() -> None:
    # IAM: with NotPrincipal and Deny, also list the account of the excluded principal.
    only_alice = key_policy(statement(Effect="Deny", Principal=None, NotPrincipal={"AWS": ALICE}))
    assert check(only_alice, ALICE).denied
    both = key_policy(statement(Effect="Deny", Principal=None, NotPrincipal={"AWS": [ALICE, ROOT]}))
    assert not check(both, ALICE).denied
    assert check(both, BOB).denied
    assert not check(both, ROOT).denied
    assert check(both, CAROL).denied
    only_account = key_policy(
        statement(Effect="Deny", Principal=None, NotPrincipal={"AWS": ACCOUNT})
    )
    assert check(only_account, ALICE).denied
    assert not check(only_account, ROOT).denied


def test_not_principal_allow_skips_a_caller_whose_arn_or_account_is_listed() -> None:
    policy = key_policy(statement(Principal=None, NotPrincipal={"AWS": CAROL}))
    assert check(policy, ALICE) == ALLOWED
    assert check(policy, CAROL) == NOTHING
    by_account = key_policy(statement(Principal=None, NotPrincipal={"AWS": OTHER_ROOT}))
    assert check(by_account, CAROL) == NOTHING
    assert check(by_account, ALICE) == ALLOWED


def test_not_principal_wildcard_excludes_everyone() -> None:
    policy = key_policy(statement(Effect="Deny", Principal=None, NotPrincipal={"AWS": "*"}))
    assert check(policy, ALICE) == NOTHING


# --------------------------------------------------------------------------- actions


@pytest.mark.parametrize(
    ("pattern", "action", "expected"),
    [
        ("kms:*", "kms:Encrypt", True),
        ("*", "kms:Decrypt", True),
        ("kms:Re*", "kms:ReEncryptFrom", True),
        ("kms:Re*", "kms:Decrypt", False),
        ("kms:Generate*", "kms:GenerateDataKeyPairWithoutPlaintext", True),
        ("kms:Generate*", "kms:ReGenerate", False),
        ("kms:?ecrypt", "kms:Decrypt", True),
        ("kms:?ecrypt", "kms:ReDecrypt", False),
        ("KMS:ENCRYPT", "kms:Encrypt", True),
        ("kms:encrypt", "KMS:Encrypt", True),
        ("kms:Encrypt", "kms:EncryptX", False),
        ("kms:Encrypt", "kms:Encryp", False),
        ("s3:*", "kms:Encrypt", False),
        ("kms:*Key*", "kms:DescribeKey", True),
    ],
)
def test_action_patterns_match_case_insensitively_with_wildcards(
    pattern: str, action: str, expected: bool
) -> None:
    assert check(key_policy(statement(Action=pattern)), action=action).allowed is expected


def test_an_action_list_matches_any_listed_action() -> None:
    policy = key_policy(statement(Action=["kms:Encrypt", "kms:GenerateDataKey*"]))
    assert check(policy, action="kms:GenerateDataKeyWithoutPlaintext").allowed
    assert not check(policy, action="kms:Decrypt").allowed


def test_not_action_matches_every_action_not_listed() -> None:
    policy = key_policy(statement(Action=None, NotAction=["kms:Schedule*", "kms:Disable*"]))
    assert check(policy, action="kms:Encrypt").allowed
    assert not check(policy, action="kms:ScheduleKeyDeletion").allowed
    assert not check(policy, action="KMS:disablekey").allowed


# --------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    ("pattern", "resource", "expected"),
    [
        ("*", KEY_ARN, True),
        ("*", "*", True),
        (KEY_ARN, KEY_ARN, True),
        (KEY_ARN, "*", False),
        (f"arn:aws:kms:*:{ACCOUNT}:key/*", KEY_ARN, True),
        (f"arn:aws:kms:*:{OTHER_ACCOUNT}:key/*", KEY_ARN, False),
        ("arn:aws:kms:us-east-?:*", KEY_ARN, True),
        (KEY_ARN.upper().replace("ARN:AWS:KMS", "arn:aws:kms"), KEY_ARN, False),
        (f"arn:aws:kms:us-east-1:{ACCOUNT}:alias/*", KEY_ARN, False),
    ],
)
def test_resource_patterns_match_case_sensitively_with_wildcards(
    pattern: str, resource: str, expected: bool
) -> None:
    assert check(key_policy(statement(Resource=pattern)), resource=resource).allowed is expected


def test_not_resource_matches_every_resource_not_listed() -> None:
    policy = key_policy(statement(Resource=None, NotResource=f"arn:aws:kms:*:{ACCOUNT}:key/*"))
    assert not check(policy, resource=KEY_ARN).allowed
    assert check(policy, resource=KEY_ARN.replace(ACCOUNT, OTHER_ACCOUNT)).allowed
    assert check(policy, resource="*").allowed


# --------------------------------------------------------------------------- strings


def test_string_equals_is_exact_and_case_sensitive() -> None:
    condition = {"StringEquals": {"kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}}
    assert holds(condition, {"kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT"})
    assert not holds(condition, {"kms:EncryptionAlgorithm": "symmetric_default"})
    assert not holds(condition, {"kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT "})


def test_string_equals_treats_wildcards_literally() -> None:
    assert not holds({"StringEquals": {"k": "app-*"}}, {"k": "app-1"})
    assert holds({"StringEquals": {"k": "app-*"}}, {"k": "app-*"})


def test_string_not_equals_holds_only_when_no_policy_value_matches() -> None:
    condition = {"StringNotEquals": {"kms:CallerAccount": [ACCOUNT, OTHER_ACCOUNT]}}
    assert holds(condition, {"kms:CallerAccount": "999999999999"})
    assert not holds(condition, {"kms:CallerAccount": OTHER_ACCOUNT})
    assert holds(condition, {})


def test_string_equals_ignore_case_and_its_negation() -> None:
    assert holds({"StringEqualsIgnoreCase": {"k": "ExampleApp"}}, {"k": "EXAMPLEAPP"})
    assert not holds({"StringEqualsIgnoreCase": {"k": "ExampleApp"}}, {"k": "OtherApp"})
    assert not holds({"StringNotEqualsIgnoreCase": {"k": "ExampleApp"}}, {"k": "exampleapp"})
    assert holds({"StringNotEqualsIgnoreCase": {"k": "ExampleApp"}}, {"k": "OtherApp"})


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("RSA*", "RSA_2048", True),
        ("RSA*", "rsa_2048", False),
        ("*", "", True),
        ("ECC_NIST_P???", "ECC_NIST_P256", True),
        ("ECC_NIST_P???", "ECC_NIST_P5210", False),
        ("a*b*c", "a-long-b-long-c", True),
        ("a*b*c", "a-long-c-long-b", False),
        ("home/${*}", "home/*", True),
        ("*ab*ab*", "xaby", False),  # two middle segments may not overlap
        ("*ab*ab*", "xabab", True),
        ("a*?*a", "aa", False),
        ("a*?*a", "aba", True),
    ],
)
def test_string_like_supports_star_and_question_mark(
    pattern: str, value: str, expected: bool
) -> None:
    assert holds({"StringLike": {"k": pattern}}, {"k": value}) is expected
    assert holds({"StringNotLike": {"k": pattern}}, {"k": value}) is not expected


def test_string_like_escapes_make_wildcard_characters_literal() -> None:
    assert holds({"StringLike": {"k": "a${?}c"}}, {"k": "a?c"})
    assert not holds({"StringLike": {"k": "a${?}c"}}, {"k": "abc"})
    assert holds({"StringLike": {"k": "cost${$}*"}}, {"k": "cost$10"})


def test_many_wildcards_cannot_make_matching_slow() -> None:
    hostile = "a*" * 40 + "b"
    value = "a" * 20_000
    policy = key_policy(
        statement(Resource="arn:" + hostile, Condition={"StringLike": {"k": hostile}})
    )
    started = time.perf_counter()
    assert not evaluate(policy, request(resource="arn:" + value, context={"k": value})).allowed
    assert not holds({"ArnLike": {"k": "arn:aws:s3:::" + hostile}}, {"k": "arn:aws:s3:::" + value})
    assert time.perf_counter() - started < 2.0


def test_values_of_one_key_are_ored_keys_and_operators_are_anded() -> None:
    condition = {
        "StringEquals": {"a": ["x", "y"], "b": "z"},
        "StringLike": {"c": "pre*"},
    }
    assert holds(condition, {"a": "y", "b": "z", "c": "prefix"})
    assert not holds(condition, {"a": "w", "b": "z", "c": "prefix"})
    assert not holds(condition, {"a": "x", "b": "Z", "c": "prefix"})
    assert not holds(condition, {"a": "x", "b": "z", "c": "suffix"})


def test_condition_key_names_are_case_insensitive() -> None:
    condition = {"StringEquals": {"KMS:CallerAccount": ACCOUNT}}
    assert holds(condition, {"kms:calleraccount": ACCOUNT})
    assert holds(condition, {"Kms:CALLERACCOUNT": ACCOUNT})


def test_encryption_context_condition_key_is_case_insensitive_but_value_is_not() -> None:
    # KMS: "the condition key, which consists of the kms:EncryptionContext: prefix and
    # the context-key replacement, is not case sensitive".
    condition = {"StringEquals": {"kms:EncryptionContext:AppName": "ExampleApp"}}
    assert holds(condition, {"kms:EncryptionContext:AppName": "ExampleApp"})
    assert holds(condition, {"kms:encryptioncontext:appname": "ExampleApp"})
    assert holds(condition, {"kms:EncryptionContext:APPNAME": "ExampleApp"})
    assert not holds(condition, {"kms:EncryptionContext:AppName": "exampleapp"})
    assert not holds(condition, {"kms:EncryptionContext:Stage": "ExampleApp"})


def test_encryption_context_keys_give_a_case_sensitive_key_check() -> None:
    condition = {
        "ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": "AppName"},
        "StringEquals": {"kms:EncryptionContext:AppName": "ExampleApp"},
    }
    assert holds(
        condition,
        {"kms:EncryptionContextKeys": ["AppName"], "kms:EncryptionContext:AppName": "ExampleApp"},
    )
    assert not holds(
        condition,
        {"kms:EncryptionContextKeys": ["appname"], "kms:EncryptionContext:appname": "ExampleApp"},
    )


def test_request_keys_differing_only_in_case_merge_into_one_multivalued_key() -> None:
    context: dict[str, object] = {
        "kms:EncryptionContext:Stage": "Test",
        "kms:EncryptionContext:stage": "Restricted",
    }
    assert holds({"StringEquals": {"kms:EncryptionContext:Stage": "Restricted"}}, context)
    assert not holds({"StringNotEquals": {"kms:EncryptionContext:Stage": "Restricted"}}, context)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("operator", "results"),
    [
        # request values 9, 10, 11 against policy value 10
        ("NumericEquals", (False, True, False)),
        ("NumericNotEquals", (True, False, True)),
        ("NumericLessThan", (True, False, False)),
        ("NumericLessThanEquals", (True, True, False)),
        ("NumericGreaterThan", (False, False, True)),
        ("NumericGreaterThanEquals", (False, True, True)),
    ],
)
def test_numeric_operators_compare_numbers(operator: str, results: tuple[bool, ...]) -> None:
    for value, expected in zip((9, "10", 11.0), results, strict=True):
        assert holds({operator: {"s3:max-keys": "10"}}, {"s3:max-keys": value}) is expected


def test_numeric_equals_compares_values_not_text() -> None:
    assert holds({"NumericEquals": {"k": "10"}}, {"k": "10.00"})
    assert holds({"NumericEquals": {"k": "1e3"}}, {"k": 1000})
    assert holds({"NumericLessThan": {"k": "-2.5"}}, {"k": "-3"})


def test_a_request_value_that_is_not_a_number_matches_no_number() -> None:
    assert not holds({"NumericEquals": {"k": "10"}}, {"k": "ten"})
    assert not holds({"NumericGreaterThan": {"k": "0"}}, {"k": True})
    assert holds({"NumericNotEquals": {"k": "10"}}, {"k": "ten"})


# --------------------------------------------------------------------------- dates


@pytest.mark.parametrize(
    ("operator", "results"),
    [
        # request times one second before, at, and after the policy time
        ("DateEquals", (False, True, False)),
        ("DateNotEquals", (True, False, True)),
        ("DateLessThan", (True, False, False)),
        ("DateLessThanEquals", (True, True, False)),
        ("DateGreaterThan", (False, False, True)),
        ("DateGreaterThanEquals", (False, True, True)),
    ],
)
def test_date_operators_compare_instants(operator: str, results: tuple[bool, ...]) -> None:
    at = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    for offset, expected in zip((-1, 0, 1), results, strict=True):
        now = at + timedelta(seconds=offset)
        assert (
            holds({operator: {"aws:CurrentTime": "2024-05-01T12:00:00Z"}}, {"aws:CurrentTime": now})
            is expected
        )


def test_dates_compare_across_iso_forms_epoch_seconds_and_zones() -> None:
    epoch = int(datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp())
    condition = {"DateEquals": {"aws:CurrentTime": "2024-05-01T12:00:00Z"}}
    assert holds(condition, {"aws:CurrentTime": "2024-05-01T14:00:00+02:00"})
    assert holds(condition, {"aws:CurrentTime": str(epoch)})
    assert holds(condition, {"aws:CurrentTime": epoch})
    assert holds(condition, {"aws:CurrentTime": float(epoch)})
    assert holds(condition, {"aws:CurrentTime": datetime(2024, 5, 1, 12)})  # naive is UTC
    assert holds(
        condition,
        {"aws:CurrentTime": datetime(2024, 5, 1, 7, tzinfo=timezone(timedelta(hours=-5)))},
    )
    by_epoch = {"DateLessThan": {"aws:EpochTime": epoch}}
    assert holds(by_epoch, {"aws:EpochTime": epoch - 1})
    assert not holds(by_epoch, {"aws:EpochTime": "2024-05-01T12:00:00Z"})
    assert holds({"DateGreaterThan": {"k": "2024-05-01"}}, {"k": "2024-05-01T00:00:01Z"})


def test_a_request_value_that_is_not_a_date_matches_no_date() -> None:
    assert not holds({"DateLessThan": {"k": "2030-01-01T00:00:00Z"}}, {"k": "soon"})
    assert not holds({"DateLessThan": {"k": "2030-01-01T00:00:00Z"}}, {"k": False})
    assert holds({"DateNotEquals": {"k": "2030-01-01T00:00:00Z"}}, {"k": "soon"})


# --------------------------------------------------------------------------- bool, binary


def test_bool_compares_true_and_false_case_insensitively() -> None:
    assert holds({"Bool": {"aws:SecureTransport": "true"}}, {"aws:SecureTransport": True})
    assert holds({"Bool": {"aws:SecureTransport": "TRUE"}}, {"aws:SecureTransport": "true"})
    assert holds({"Bool": {"aws:SecureTransport": False}}, {"aws:SecureTransport": False})
    assert not holds({"Bool": {"aws:SecureTransport": "true"}}, {"aws:SecureTransport": False})
    assert not holds({"Bool": {"aws:SecureTransport": "true"}}, {})


def test_binary_equals_compares_bytes_with_a_base64_policy_value() -> None:
    condition = {"BinaryEquals": {"k": "QmluYXJ5VmFsdWVJbkJhc2U2NA=="}}
    assert holds(condition, {"k": b"BinaryValueInBase64"})
    assert holds(condition, {"k": "QmluYXJ5VmFsdWVJbkJhc2U2NA=="})
    assert not holds(condition, {"k": b"binaryvalueinbase64"})
    assert not holds(condition, {"k": "not base64!"})


# --------------------------------------------------------------------------- IP addresses


@pytest.mark.parametrize(
    ("cidr", "address", "expected"),
    [
        ("203.0.113.0/24", "203.0.113.7", True),
        ("203.0.113.0/24", "203.0.114.7", False),
        ("203.0.113.5", "203.0.113.5", True),  # no prefix means /32
        ("203.0.113.5", "203.0.113.6", False),
        ("2001:DB8:1234:5678::/64", "2001:db8:1234:5678::1", True),
        ("2001:DB8:1234:5678::/64", "2001:db8:1234:5679::1", False),
        ("0.0.0.0/0", "2001:db8::1", False),
        ("::/0", "203.0.113.7", False),
        ("203.0.113.0/24", "not-an-ip", False),
        ("203.0.113.0/24", "AWS Internal", False),
    ],
)
def test_ip_address_matches_ipv4_and_ipv6_cidr_ranges(
    cidr: str, address: str, expected: bool
) -> None:
    assert holds({"IpAddress": {"aws:SourceIp": cidr}}, {"aws:SourceIp": address}) is expected
    assert holds({"NotIpAddress": {"aws:SourceIp": cidr}}, {"aws:SourceIp": address}) is (
        not expected
    )


def test_ip_address_accepts_a_list_of_ipv4_and_ipv6_ranges() -> None:
    condition = {"IpAddress": {"aws:SourceIp": ["203.0.113.0/24", "2001:DB8:1234:5678::/64"]}}
    assert holds(condition, {"aws:SourceIp": "2001:db8:1234:5678::abcd"})
    assert holds(condition, {"aws:SourceIp": "203.0.113.200"})
    assert not holds(condition, {"aws:SourceIp": "198.51.100.1"})


# --------------------------------------------------------------------------- ARNs


@pytest.mark.parametrize("operator", ["ArnLike", "ArnEquals"])
def test_arn_operators_match_each_component_separately(operator: str) -> None:
    pattern = "arn:aws:iam::*:role/Admin*"
    assert holds({operator: {"aws:PrincipalArn": pattern}}, {"aws:PrincipalArn": APP_ROLE}) is (
        False
    )
    admin = f"arn:aws:iam::{ACCOUNT}:role/AdminTeam"
    assert holds({operator: {"aws:PrincipalArn": pattern}}, {"aws:PrincipalArn": admin})


def test_arn_like_wildcards_do_not_cross_colons_unlike_string_like() -> None:
    # The IAM User Guide's example.
    pattern = "arn:aws:someservice:*:111122223333:finance/*"
    value = "arn:aws:someservice:us-east-2:999999999999:store/abc:111122223333:finance/doc.txt"
    assert holds({"StringLike": {"aws:SourceArn": pattern}}, {"aws:SourceArn": value})
    assert not holds({"ArnLike": {"aws:SourceArn": pattern}}, {"aws:SourceArn": value})
    assert holds({"ArnNotLike": {"aws:SourceArn": pattern}}, {"aws:SourceArn": value})


def test_arn_like_lets_the_resource_part_hold_colons() -> None:
    pattern = "arn:aws:logs:us-east-1:111122223333:log-group:app:*"
    value = "arn:aws:logs:us-east-1:111122223333:log-group:app:log-stream:x"
    assert holds({"ArnLike": {"aws:SourceArn": pattern}}, {"aws:SourceArn": value})


def test_arn_like_is_case_sensitive_and_needs_six_components() -> None:
    assert not holds(
        {"ArnLike": {"aws:SourceArn": "arn:aws:sns:*:*:Topic"}},
        {"aws:SourceArn": "arn:aws:sns:us-east-1:111122223333:topic"},
    )
    assert not holds({"ArnLike": {"aws:SourceArn": "arn:aws:*"}}, {"aws:SourceArn": KEY_ARN})
    assert not holds({"ArnLike": {"aws:SourceArn": KEY_ARN}}, {"aws:SourceArn": "not-an-arn"})
    assert holds({"ArnLike": {"aws:SourceArn": "*"}}, {"aws:SourceArn": KEY_ARN})


def test_arn_not_equals_holds_for_a_different_arn_and_a_missing_key() -> None:
    condition = {"ArnNotEquals": {"aws:SourceArn": KEY_ARN}}
    assert holds(condition, {"aws:SourceArn": KEY_ARN + "x"})
    assert not holds(condition, {"aws:SourceArn": KEY_ARN})
    assert holds(condition, {})


# --------------------------------------------------------------------------- Null, IfExists


@pytest.mark.parametrize(
    ("value", "context", "expected"),
    [
        ("true", {}, True),
        ("true", {"k": "v"}, False),
        ("false", {}, False),
        ("false", {"k": "v"}, True),
        (True, {"k": []}, True),
        (True, {"k": None}, True),
        (False, {"K": ["a"]}, True),
    ],
)
def test_null_checks_whether_the_key_is_absent(
    value: object, context: dict[str, object], expected: bool
) -> None:
    assert holds({"Null": {"k": value}}, context) is expected


ALL_OPERATORS = [
    ("StringEquals", "v", False),
    ("StringNotEquals", "v", True),
    ("StringEqualsIgnoreCase", "v", False),
    ("StringNotEqualsIgnoreCase", "v", True),
    ("StringLike", "v*", False),
    ("StringNotLike", "v*", True),
    ("NumericEquals", "1", False),
    ("NumericNotEquals", "1", True),
    ("NumericLessThan", "1", False),
    ("NumericLessThanEquals", "1", False),
    ("NumericGreaterThan", "1", False),
    ("NumericGreaterThanEquals", "1", False),
    ("DateEquals", "2024-01-01T00:00:00Z", False),
    ("DateNotEquals", "2024-01-01T00:00:00Z", True),
    ("DateLessThan", "2024-01-01T00:00:00Z", False),
    ("DateLessThanEquals", "2024-01-01T00:00:00Z", False),
    ("DateGreaterThan", "2024-01-01T00:00:00Z", False),
    ("DateGreaterThanEquals", "2024-01-01T00:00:00Z", False),
    ("Bool", "true", False),
    ("BinaryEquals", "dg==", False),
    ("IpAddress", "10.0.0.0/8", False),
    ("NotIpAddress", "10.0.0.0/8", True),
    ("ArnEquals", KEY_ARN, False),
    ("ArnLike", KEY_ARN, False),
    ("ArnNotEquals", KEY_ARN, True),
    ("ArnNotLike", KEY_ARN, True),
]


@pytest.mark.parametrize(("operator", "value", "negated"), ALL_OPERATORS)
def test_a_missing_key_fails_positive_operators_and_satisfies_negated_ones(
    operator: str, value: str, negated: bool
) -> None:
    assert holds({operator: {"k": value}}, {"other": value}) is negated


@pytest.mark.parametrize(("operator", "value", "negated"), ALL_OPERATORS)
def test_if_exists_makes_a_missing_key_satisfy_every_operator(
    operator: str, value: str, negated: bool
) -> None:
    assert holds({operator + "IfExists": {"k": value}}, {})
    assert holds({operator + "IfExists": {"k": value}}, {"k": []})


def test_if_exists_still_checks_a_present_key() -> None:
    assert holds({"StringLikeIfExists": {"ec2:InstanceType": "t2.*"}}, {"ec2:InstanceType": "t2.a"})
    assert not holds(
        {"StringLikeIfExists": {"ec2:InstanceType": "t2.*"}}, {"ec2:InstanceType": "m5.a"}
    )
    assert not holds({"StringNotEqualsIfExists": {"k": "v"}}, {"k": "v"})
    assert holds({"NumericLessThanIfExists": {"k": "5"}}, {"k": 4})
    assert not holds({"IpAddressIfExists": {"k": "10.0.0.0/8"}}, {"k": "11.0.0.1"})


# --------------------------------------------------------------------------- set operators


def test_for_any_value_needs_one_request_value_to_match() -> None:
    condition = {"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": ["AppName", "Dept"]}}
    assert holds(condition, {"kms:EncryptionContextKeys": ["Project", "AppName"]})
    assert not holds(condition, {"kms:EncryptionContextKeys": ["Project"]})
    assert not holds(condition, {"kms:EncryptionContextKeys": []})
    assert not holds(condition, {})


def test_for_all_values_needs_every_request_value_to_match() -> None:
    condition = {"ForAllValues:StringEquals": {"kms:GrantOperations": ["Encrypt", "Decrypt"]}}
    assert holds(condition, {"kms:GrantOperations": ["Decrypt"]})
    assert holds(condition, {"kms:GrantOperations": ("Encrypt", "Decrypt")})
    assert not holds(condition, {"kms:GrantOperations": ["Decrypt", "CreateGrant"]})
    assert holds(condition, {"kms:GrantOperations": []})
    assert holds(condition, {})


def test_set_operators_work_with_wildcard_operators() -> None:
    condition = {"ForAllValues:StringLike": {"aws:TagKeys": ["Created*", "Owner"]}}
    assert holds(condition, {"aws:TagKeys": ["CreatedBy", "CreatedAt", "Owner"]})
    assert not holds(condition, {"aws:TagKeys": ["CreatedBy", "Team"]})


def test_set_operators_with_negated_operators_apply_the_negation_per_request_value() -> None:
    any_not = {"ForAnyValue:StringNotEquals": {"k": ["a", "b"]}}
    assert holds(any_not, {"k": ["a", "c"]})
    assert not holds(any_not, {"k": ["a", "b"]})
    assert not holds(any_not, {})
    all_not = {"ForAllValues:StringNotEquals": {"k": ["a", "b"]}}
    assert holds(all_not, {"k": ["c", "d"]})
    assert not holds(all_not, {"k": ["c", "a"]})
    assert holds(all_not, {})


def test_set_operators_with_if_exists_hold_for_a_missing_key() -> None:
    assert holds({"ForAnyValue:StringEqualsIfExists": {"k": "a"}}, {})
    assert not holds({"ForAnyValue:StringEqualsIfExists": {"k": "a"}}, {"k": ["b"]})
    assert holds({"ForAllValues:StringEqualsIfExists": {"k": "a"}}, {})


def test_a_set_operator_treats_a_single_request_value_as_a_set_of_one() -> None:
    assert holds({"ForAnyValue:StringEquals": {"k": ["a", "b"]}}, {"k": "b"})
    assert not holds({"ForAllValues:StringEquals": {"k": ["a", "b"]}}, {"k": "c"})


def test_a_plain_operator_on_a_multivalued_key_matches_if_any_value_matches() -> None:
    assert holds({"StringEquals": {"k": "b"}}, {"k": ["a", "b"]})
    assert not holds({"StringEquals": {"k": "c"}}, {"k": ["a", "b"]})
    # and its negation holds only if no value matches
    assert not holds({"StringNotEquals": {"k": "b"}}, {"k": ["a", "b"]})
    assert holds({"StringNotEquals": {"k": "c"}}, {"k": ["a", "b"]})


def test_for_all_values_alone_allows_an_unspecified_context_but_with_a_pair_it_does_not() -> None:
    # The KMS guide's pattern: require AppName=ExampleApp and forbid other keys.
    condition = {
        "StringEquals": {"kms:EncryptionContext:AppName": "ExampleApp"},
        "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["AppName"]},
    }
    assert holds(
        condition,
        {"kms:EncryptionContext:AppName": "ExampleApp", "kms:EncryptionContextKeys": ["AppName"]},
    )
    assert not holds(condition, {})
    assert not holds(
        condition,
        {
            "kms:EncryptionContext:AppName": "ExampleApp",
            "kms:EncryptionContext:Stage": "Prod",
            "kms:EncryptionContextKeys": ["AppName", "Stage"],
        },
    )


# --------------------------------------------------------------------------- variables


def test_policy_variables_resolve_from_the_request() -> None:
    condition = {"StringEquals": {"kms:EncryptionContext:user": "${aws:username}"}}
    assert holds(condition, {"kms:EncryptionContext:user": "alice"})
    assert not holds(condition, {"kms:EncryptionContext:user": "bob"})
    by_arn = {"ArnEquals": {"aws:SourceArn": "${aws:PrincipalArn}"}}
    assert holds(by_arn, {"aws:SourceArn": ALICE})
    by_account = {"StringEquals": {"kms:CallerAccount": "${aws:PrincipalAccount}"}}
    assert holds(by_account, {"kms:CallerAccount": ACCOUNT})


def test_policy_variables_resolve_from_context_keys_case_insensitively() -> None:
    condition = {"StringLike": {"s3:prefix": "home/${AWS:UserId}/*"}}
    assert holds(condition, {"aws:userid": "AID1", "s3:prefix": "home/AID1/docs"})
    assert not holds(condition, {"aws:userid": "AID1", "s3:prefix": "home/AID2/docs"})


def test_a_substituted_variable_is_literal_even_in_string_like() -> None:
    condition = {"StringLike": {"k": "${aws:userid}"}}
    assert holds(condition, {"aws:userid": "a*", "k": "a*"})
    assert not holds(condition, {"aws:userid": "a*", "k": "abc"})


def test_a_missing_variable_uses_its_default_or_matches_nothing() -> None:
    with_default = {"StringEquals": {"k": "${aws:userid, 'nobody'}"}}
    assert holds(with_default, {"k": "nobody"})
    without = {"StringEquals": {"k": "${aws:userid}"}}
    assert not holds(without, {"k": "${aws:userid}"})
    assert not holds(without, {"k": ""})
    assert holds({"StringNotEquals": {"k": "${aws:userid}"}}, {"k": "x"})


def test_policy_variables_work_in_resources() -> None:
    policy = key_policy(statement(Resource="arn:aws:kms:*:${aws:PrincipalAccount}:key/*"))
    assert check(policy, ALICE, resource=KEY_ARN).allowed
    assert not check(policy, CAROL, resource=KEY_ARN).allowed


def test_policy_variables_are_literal_text_in_version_2008_10_17() -> None:
    condition = {"StringEquals": {"k": "${aws:username}"}}
    old = key_policy(statement(Condition=condition), version="2008-10-17")
    assert not evaluate(old, request(context={"k": "alice"})).allowed
    assert evaluate(old, request(context={"k": "${aws:username}"})).allowed


def test_a_multivalued_key_cannot_be_a_policy_variable() -> None:
    condition = {"StringEquals": {"k": "${aws:TagKeys}"}}
    assert not holds(condition, {"aws:TagKeys": ["a", "b"], "k": "a"})


# --------------------------------------------------------------------------- properties


def _wildcard_reference(pattern: str, value: str) -> bool:
    """fnmatch without bracket classes (the alphabet below holds no brackets)."""
    return fnmatch.fnmatchcase(value, pattern)


@settings(max_examples=400)
@given(
    pattern=st.text(alphabet="ab*?:/-", max_size=12),
    value=st.text(alphabet="ab:/-\n", max_size=12),
)
def test_string_like_agrees_with_a_reference_wildcard_matcher(pattern: str, value: str) -> None:
    expected = _wildcard_reference(pattern, value)
    assert holds({"StringLike": {"k": pattern}}, {"k": value}) is expected
    assert holds({"StringNotLike": {"k": pattern}}, {"k": value}) is (not expected)


@given(pattern=st.text(alphabet="aBc*?", max_size=10), name=st.text(alphabet="AbC", max_size=10))
def test_action_matching_is_the_reference_matcher_ignoring_case(pattern: str, name: str) -> None:
    policy = key_policy(statement(Action=f"kms:{pattern}" if pattern else "kms:*"))
    expected = _wildcard_reference((pattern or "*").lower(), name.lower())
    assert check(policy, action=f"kms:{name}").allowed is expected


@given(
    policy_values=st.lists(st.text(max_size=5), min_size=1, max_size=3),
    request_values=st.lists(st.text(max_size=5), max_size=3),
)
def test_a_negated_operator_is_the_negation_of_its_positive_twin(
    policy_values: list[str], request_values: list[str]
) -> None:
    context: dict[str, object] = {"k": request_values}
    positive = holds({"StringEquals": {"k": policy_values}}, context)
    assert holds({"StringNotEquals": {"k": policy_values}}, context) is (not positive)


@given(key=st.sampled_from(["kms:EncryptionContext:AppName", "aws:SourceVpc"]), data=st.data())
def test_the_case_of_a_request_key_never_changes_the_answer(key: str, data: st.DataObject) -> None:
    flips = data.draw(st.lists(st.booleans(), min_size=len(key), max_size=len(key)))
    recased = "".join(c.upper() if flip else c.lower() for c, flip in zip(key, flips, strict=True))
    condition = {"StringEquals": {key: "v"}}
    assert holds(condition, {recased: "v"})
    assert not holds(condition, {recased: "V"})


_POLICY_WORDS = ["Version", "Statement", "Effect", "Principal", "AWS", "Action", "Resource",
                 "Condition", "StringEquals", "Sid", "k", "2012-10-17", "Allow", "*"]  # fmt: skip
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(_POLICY_WORDS), children, max_size=4)
    ),
    max_leaves=20,
)


@given(document=_json)
def test_parsing_arbitrary_json_either_succeeds_or_raises_malformed(document: object) -> None:
    try:
        policy = parse_policy(json.dumps(document))
    except MalformedPolicyDocumentError:
        return
    evaluate(policy, request())  # a parsed policy always evaluates


@given(text=st.text(max_size=60))
def test_parsing_arbitrary_text_either_succeeds_or_raises_malformed(text: str) -> None:
    with contextlib.suppress(MalformedPolicyDocumentError):
        parse_policy(text)


# ------------------------------------------------------------------ memo of answers

MEMO_POLICIES = [
    DEFAULT_KEY_POLICY,
    json.dumps(
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": [ALICE, OTHER_ACCOUNT]},
                    "Action": ["kms:Encrypt", "kms:Gen*"],
                    "Resource": "*",
                },
                {
                    "Effect": "Deny",
                    "NotPrincipal": {"AWS": [ROOT, BOB]},
                    "NotAction": "kms:Describe*",
                    "Resource": KEY_ARN,
                },
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "kms:Decrypt",
                    "Resource": "arn:aws:kms:us-east-1:*:key/*",
                },
            ]
        }
    ),
]


@pytest.mark.parametrize("text", MEMO_POLICIES)
def test_a_context_free_policy_remembers_exactly_what_evaluation_answers(text: str) -> None:
    policy = parse_policy(text)
    assert policy.context_free
    cases = [
        request(p, action=a, resource=r)
        for p in (ROOT, ALICE, BOB, APP_ROLE, OTHER_ROOT, CAROL)
        for a in ("kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey")
        for r in (KEY_ARN, KEY_ARN.replace("us-east-1", "eu-west-1"))
    ]
    fresh = [parse_policy(text) for _ in cases]  # a new Policy each: nothing remembered
    expected = [evaluate(f, c) for f, c in zip(fresh, cases, strict=True)]
    assert [evaluate(policy, c) for c in cases] == expected  # fills the memo
    assert len(policy.memo) == len(cases)
    assert [evaluate(policy, c) for c in cases] == expected  # answers from it


@pytest.mark.parametrize(
    "extra",
    [
        {"Condition": {"StringEquals": {"kms:EncryptionContext:app": "a"}}},
        {"Resource": "arn:aws:kms:*:${aws:PrincipalAccount}:key/*"},
    ],
)
def test_a_policy_with_a_condition_or_a_variable_is_evaluated_every_time(
    extra: dict[str, Any],
) -> None:
    policy = key_policy(statement(**extra))
    assert not policy.context_free
    first = evaluate(policy, request(context={"kms:EncryptionContext:app": "a"}))
    evaluate(policy, request(context={"kms:EncryptionContext:app": "b"}))
    assert policy.memo == {}
    assert first.allowed


def test_a_context_dependent_answer_changes_with_the_context() -> None:
    policy = key_policy(statement(Condition={"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}))
    assert evaluate(policy, request(context={"aws:SourceIp": "10.1.2.3"})).allowed
    assert not evaluate(policy, request(context={"aws:SourceIp": "192.0.2.1"})).allowed


def test_authorize_key_builds_the_condition_context_only_when_a_policy_reads_it() -> None:
    from ledger import authz

    built: list[int] = []

    def context() -> dict[str, object]:
        built.append(1)
        return {"aws:SourceIp": "10.1.2.3"}

    alice = authz.principal_of(ALICE, [parse_policy(json.dumps({"Statement": [
        {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}), identity=True)])  # fmt: skip
    plain = parse_policy(DEFAULT_KEY_POLICY)
    conditional = key_policy(
        statement(Condition={"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}),
    )

    def decide(policy: Policy) -> None:
        authz.authorize_key(
            principal=alice, action="kms:Encrypt", operation="Encrypt", key_arn=KEY_ARN,
            key_policy=policy, key_grants=(), context=authz.LazyContext(context),
            encryption_context=None,
        )  # fmt: skip

    decide(plain)
    assert built == []  # context-free policies settled it
    decide(conditional)
    assert built == [1]  # built once, for the condition
