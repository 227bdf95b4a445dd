"""AWS KMS's key state table (developer guide, "Key states of AWS KMS keys").

Cells asserted by name are read from the guide's table (footnote numbers in comments).
Rows the 2022 table lacks (DeriveSharedSecret, RotateKeyOnDemand, ListKeyRotations) are
pinned as the inferences the module documents.
"""

from __future__ import annotations

import pytest

from ledger.domain.key_states import (
    ALLOWED,
    DISABLED,
    DISABLED_EXCEPTION,
    ENABLED,
    INVALID_STATE,
    KEY_STATE_TABLE,
    OPERATIONS,
    PENDING_DELETION,
    PENDING_IMPORT,
    STATES,
    check_key_state,
    key_state_outcome,
)
from ledger.errors import DisabledError, KMSInvalidStateError

ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"

REQUIRED_OPERATIONS = [
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
    "Sign",
    "Verify",
    "GetPublicKey",
    "DeriveSharedSecret",
    "DescribeKey",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "UpdateKeyDescription",
    "TagResource",
    "UntagResource",
    "ListResourceTags",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "GetKeyRotationStatus",
    "RotateKeyOnDemand",
    "ListKeyRotations",
    "GetKeyPolicy",
    "PutKeyPolicy",
    "ListKeyPolicies",
    "CreateGrant",
    "ListGrants",
    "RetireGrant",
    "RevokeGrant",
    "GetParametersForImport",
    "ImportKeyMaterial",
    "DeleteImportedKeyMaterial",
]

CRYPTOGRAPHIC = (
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
    "Sign",
    "Verify",
    "GetPublicKey",
    "DeriveSharedSecret",
)

ALWAYS_ALLOWED = (
    "DescribeKey",
    "ListResourceTags",
    "DeleteAlias",
    "GetKeyPolicy",
    "PutKeyPolicy",
    "ListKeyPolicies",
    "ListGrants",
    "RetireGrant",
    "RevokeGrant",
    "DeleteImportedKeyMaterial",
)


def raised(operation: str, state: str) -> tuple[str, str] | None:
    """(AWS error name, message) that check_key_state raises, or None when it allows."""
    try:
        check_key_state(operation, state, ARN)
    except (DisabledError, KMSInvalidStateError) as error:
        return error.aws_name, error.message
    return None


def test_table_covers_every_listed_operation_in_all_four_states() -> None:
    assert set(REQUIRED_OPERATIONS) <= set(OPERATIONS)
    assert STATES == ("Enabled", "Disabled", "PendingDeletion", "PendingImport")
    for operation in OPERATIONS:
        assert set(KEY_STATE_TABLE[operation]) == set(STATES), operation


def test_every_cell_is_allowed_or_an_aws_error_name() -> None:
    for operation, row in KEY_STATE_TABLE.items():
        for state, outcome in row.items():
            assert outcome in {ALLOWED, DISABLED_EXCEPTION, INVALID_STATE}, (operation, state)


def test_disabled_exception_appears_only_for_a_disabled_key() -> None:
    for operation, row in KEY_STATE_TABLE.items():
        for state, outcome in row.items():
            if outcome == DISABLED_EXCEPTION:
                assert state == DISABLED, operation


def test_only_cancel_key_deletion_refuses_an_enabled_key() -> None:
    refusing = {op for op, row in KEY_STATE_TABLE.items() if row[ENABLED] != ALLOWED}
    assert refusing == {"CancelKeyDeletion"}


def test_table_cannot_be_modified() -> None:
    with pytest.raises(TypeError):
        KEY_STATE_TABLE["Encrypt"] = KEY_STATE_TABLE["DescribeKey"]  # type: ignore[index]
    with pytest.raises(TypeError):
        KEY_STATE_TABLE["Encrypt"][DISABLED] = ALLOWED  # type: ignore[index]


@pytest.mark.parametrize("operation", CRYPTOGRAPHIC)
def test_cryptographic_operations_are_allowed_only_on_an_enabled_key(operation: str) -> None:
    assert raised(operation, ENABLED) is None
    # [1]
    assert raised(operation, DISABLED) == ("DisabledException", f"{ARN} is disabled.")
    # [2] or [3]: [3] chosen.
    assert raised(operation, PENDING_DELETION) == (
        "KMSInvalidStateException",
        f"{ARN} is pending deletion.",
    )
    # [5] (N/A in the 2022 table for asymmetric and HMAC keys; refused the same way).
    assert raised(operation, PENDING_IMPORT) == (
        "KMSInvalidStateException",
        f"{ARN} is pending import.",
    )


def test_encrypt_on_a_disabled_key_raises_disabled_exception() -> None:
    with pytest.raises(DisabledError) as info:
        check_key_state("Encrypt", DISABLED, ARN)
    assert info.value.aws_name == "DisabledException"
    assert info.value.message == f"{ARN} is disabled."


def test_encrypt_on_a_key_pending_deletion_raises_invalid_state_with_aws_message() -> None:
    with pytest.raises(KMSInvalidStateError) as info:
        check_key_state("Encrypt", PENDING_DELETION, ARN)
    assert info.value.aws_name == "KMSInvalidStateException"
    assert str(info.value) == f"{ARN} is pending deletion."


@pytest.mark.parametrize("operation", ALWAYS_ALLOWED)
@pytest.mark.parametrize("state", STATES)
def test_operation_is_allowed_in_every_state(operation: str, state: str) -> None:
    check_key_state(operation, state, ARN)


@pytest.mark.parametrize("state", [ENABLED, DISABLED, PENDING_IMPORT])
def test_cancel_key_deletion_fails_on_a_key_not_pending_deletion(state: str) -> None:
    # [4]
    assert raised("CancelKeyDeletion", state) == (
        "KMSInvalidStateException",
        f"{ARN} is not pending deletion.",
    )


def test_cancel_key_deletion_succeeds_on_a_key_pending_deletion() -> None:
    check_key_state("CancelKeyDeletion", PENDING_DELETION, ARN)


@pytest.mark.parametrize("operation", ["EnableKey", "DisableKey"])
def test_enable_and_disable_key_accept_enabled_and_disabled_but_not_pending(
    operation: str,
) -> None:
    assert raised(operation, ENABLED) is None
    assert raised(operation, DISABLED) is None
    # [3]
    assert raised(operation, PENDING_DELETION) == (
        "KMSInvalidStateException",
        f"{ARN} is pending deletion.",
    )
    # [5]
    assert raised(operation, PENDING_IMPORT) == (
        "KMSInvalidStateException",
        f"{ARN} is pending import.",
    )


@pytest.mark.parametrize(
    "operation",
    [
        "ScheduleKeyDeletion",
        "UpdateKeyDescription",
        "TagResource",
        "UntagResource",
        "CreateAlias",
        "UpdateAlias",
    ],
)
def test_metadata_changes_are_refused_only_while_pending_deletion(operation: str) -> None:
    for state in (ENABLED, DISABLED, PENDING_IMPORT):
        assert raised(operation, state) is None, state
    # [3]; for UpdateAlias, [10] for the new target key.
    assert raised(operation, PENDING_DELETION) == (
        "KMSInvalidStateException",
        f"{ARN} is pending deletion.",
    )


def test_create_grant_on_a_disabled_key_raises_disabled_exception() -> None:
    assert raised("CreateGrant", ENABLED) is None
    assert raised("CreateGrant", DISABLED) == ("DisabledException", f"{ARN} is disabled.")
    assert key_state_outcome("CreateGrant", PENDING_DELETION) == INVALID_STATE
    assert key_state_outcome("CreateGrant", PENDING_IMPORT) == INVALID_STATE


@pytest.mark.parametrize(
    "operation", ["EnableKeyRotation", "DisableKeyRotation", "RotateKeyOnDemand"]
)
def test_rotation_changes_follow_the_symmetric_aws_kms_key(operation: str) -> None:
    # ?[7] | [1] or [7] | [3] or [7] for a symmetric AWS_KMS key.
    assert raised(operation, ENABLED) is None
    assert raised(operation, DISABLED) == ("DisabledException", f"{ARN} is disabled.")
    assert raised(operation, PENDING_DELETION) == (
        "KMSInvalidStateException",
        f"{ARN} is pending deletion.",
    )
    assert key_state_outcome(operation, PENDING_IMPORT) == INVALID_STATE


@pytest.mark.parametrize("operation", ["GetKeyRotationStatus", "ListKeyRotations"])
def test_rotation_reads_answer_for_disabled_and_pending_deletion_keys(operation: str) -> None:
    for state in (ENABLED, DISABLED, PENDING_DELETION):
        assert raised(operation, state) is None, state
    assert key_state_outcome(operation, PENDING_IMPORT) == INVALID_STATE


@pytest.mark.parametrize("operation", ["GetParametersForImport", "ImportKeyMaterial"])
def test_import_operations_are_refused_only_while_pending_deletion(operation: str) -> None:
    for state in (ENABLED, DISABLED, PENDING_IMPORT):
        assert raised(operation, state) is None, state
    # [8]
    assert raised(operation, PENDING_DELETION) == (
        "KMSInvalidStateException",
        f"{ARN} is pending deletion.",
    )


def test_unknown_operation_is_a_programming_error() -> None:
    with pytest.raises(KeyError, match="CreateKey"):
        check_key_state("CreateKey", ENABLED, ARN)


def test_unknown_state_is_a_programming_error() -> None:
    with pytest.raises(KeyError, match="Unavailable"):
        check_key_state("Encrypt", "Unavailable", ARN)


def test_state_constants_are_the_aws_key_state_values() -> None:
    assert (ENABLED, DISABLED, PENDING_DELETION, PENDING_IMPORT) == (
        "Enabled",
        "Disabled",
        "PendingDeletion",
        "PendingImport",
    )


def test_every_refusal_carries_an_aws_message_naming_the_key() -> None:
    for operation in OPERATIONS:
        for state in STATES:
            result = raised(operation, state)
            expected = key_state_outcome(operation, state)
            if expected == ALLOWED:
                assert result is None, (operation, state)
            else:
                assert result is not None, (operation, state)
                assert result[0] == expected, (operation, state)
                assert result[1].startswith(f"{ARN} is "), (operation, state)
