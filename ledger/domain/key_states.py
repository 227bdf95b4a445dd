"""AWS KMS's key state table: which key states each operation on an existing key accepts.

Source: "Key states of AWS KMS keys", AWS KMS Developer Guide,
https://docs.aws.amazon.com/kms/latest/developerguide/key-state.html
The live page's table could not be read in full here, so the cells were transcribed from
the guide's own markdown in ``awsdocs/aws-kms-developer-guide`` (``doc_source/key-state.md``
at commit 38281913dc98580974493b2f5194abcd5125d1e0, its latest copy there, 2022). Footnote
numbers ``[n]`` below are that table's. The ``Error`` list each operation has in botocore's
``kms/2014-11-01/service-2.json`` agrees with every refusal encoded here: every operation
that refuses a Disabled key lists ``DisabledException``, and every operation that refuses
any state lists ``KMSInvalidStateException``.

That 2022 table has no rows for DeriveSharedSecret, RotateKeyOnDemand or ListKeyRotations
(2024 operations). Their rows below are inferred: DeriveSharedSecret from Sign,
RotateKeyOnDemand from EnableKeyRotation and ListKeyRotations from GetKeyRotationStatus.
Botocore's error lists fit these inferences: RotateKeyOnDemand lists ``DisabledException``,
and ListKeyRotations does not.

Where AWS marks a cell "?" or "[a] or [b]", the row follows a symmetric encryption key of
origin ``AWS_KMS`` in the default key store, and says so in a comment. A cell where AWS's
answer is ``UnsupportedOperationException`` because of the key's origin or spec
(footnotes [6], [7] and [9]) is not a key state rule. This table leaves it to the
operation's own origin or spec check, which should run before ``check_key_state``.

Only the four states KeyLedger keys can be in are modelled. The custom key store and
multi-Region states (``Unavailable``, ``Creating``, ``Updating``,
``PendingReplicaDeletion``) are left out.

Error messages (``<arn>`` is the key ARN):

- ``DisabledException: <arn> is disabled.``: footnote [1]. A real AWS response carries the
  same text (``/work/shared/reference/aws-error-messages.tsv``).
- ``KMSInvalidStateException: <arn> is pending deletion.``: footnote [3]. The 2022 text
  adds "(or pending replica deletion)", meaning the multi-Region state. A real response
  with exactly this text is quoted in hashicorp/terraform-provider-aws#17889.
- ``KMSInvalidStateException: <arn> is pending import.``: footnote [5]. A real AWS
  response carries the same text (``aws-error-messages.tsv``).
- ``KMSInvalidStateException: <arn> is not pending deletion.``: footnote [4] in the 2020
  version of the guide, which has no parenthesis. NOT confirmed against a real AWS
  response.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal

from ledger.errors import DisabledError, KMSInvalidStateError

ENABLED: Final = "Enabled"
DISABLED: Final = "Disabled"
PENDING_DELETION: Final = "PendingDeletion"
PENDING_IMPORT: Final = "PendingImport"

STATES: Final = (ENABLED, DISABLED, PENDING_DELETION, PENDING_IMPORT)

Outcome = Literal["Allowed", "DisabledException", "KMSInvalidStateException"]

ALLOWED: Final = "Allowed"
DISABLED_EXCEPTION: Final = "DisabledException"
INVALID_STATE: Final = "KMSInvalidStateException"


def _row(
    enabled: Outcome, disabled: Outcome, pending_deletion: Outcome, pending_import: Outcome
) -> Mapping[str, Outcome]:
    return MappingProxyType(
        {
            ENABLED: enabled,
            DISABLED: disabled,
            PENDING_DELETION: pending_deletion,
            PENDING_IMPORT: pending_import,
        }
    )


_ALWAYS = _row(ALLOWED, ALLOWED, ALLOWED, ALLOWED)

# Encrypt and its kin: ✓ | [1] | [2] or [3] | [5]. Footnote [2] is DisabledException with
# the "pending deletion" text, and [3] is KMSInvalidStateException with the same text.
# [3] is the one chosen: it lets a caller tell Disabled and PendingDeletion apart by error
# name, and it gives one state one error across every operation.
_CRYPTO = _row(ALLOWED, DISABLED_EXCEPTION, INVALID_STATE, INVALID_STATE)

# Sign, Verify, GetPublicKey, GenerateMac and VerifyMac: ✓ | [1] | [2] or [3] | N/A. The
# 2022 table has N/A for PendingImport because asymmetric and HMAC keys could not yet take
# imported material. Now they can, and this row refuses such a key like any other
# cryptographic operation does ([5]). That PendingImport cell is inferred.
_ASYMMETRIC_OR_HMAC = _CRYPTO

# Key metadata changes (UpdateKeyDescription, TagResource, UntagResource, CreateAlias,
# ScheduleKeyDeletion): ✓ | ✓ | [3] | ✓.
_NOT_PENDING_DELETION = _row(ALLOWED, ALLOWED, INVALID_STATE, ALLOWED)

# EnableKeyRotation / DisableKeyRotation: ?[7] | [1] or [7] | [3] or [7] | [6]. For a
# symmetric AWS_KMS key, [7] (UnsupportedOperationException for imported or custom key
# store keys) never applies, so these are ✓ | [1] | [3]. [6] is an origin rule (EXTERNAL is
# not valid here). An AWS_KMS key is never PendingImport. This row still refuses the state
# with [5], so that a missing origin check cannot let the operation through.
_ROTATION_CHANGE = _row(ALLOWED, DISABLED_EXCEPTION, INVALID_STATE, INVALID_STATE)

# GetKeyRotationStatus: ?[7] | ?[7] | ?[7] | [6]. A symmetric AWS_KMS key is allowed in
# all three. The PendingImport cell follows the same reasoning as _ROTATION_CHANGE.
_ROTATION_READ = _row(ALLOWED, ALLOWED, ALLOWED, INVALID_STATE)

# GetParametersForImport / ImportKeyMaterial: ?[9] | ?[9] | [8] or [9] | ✓. Footnote [9]
# is UnsupportedOperationException for a key that cannot hold imported material (origin
# AWS_KMS): an origin rule. So state alone allows Enabled and Disabled, and for
# PendingDeletion the state rule [8] applies (KMSInvalidStateException).
_IMPORT = _row(ALLOWED, ALLOWED, INVALID_STATE, ALLOWED)

KEY_STATE_TABLE: Final[Mapping[str, Mapping[str, Outcome]]] = MappingProxyType(
    {
        # Cryptographic operations.
        "Encrypt": _CRYPTO,
        "Decrypt": _CRYPTO,
        # Applied to each key on its own: the source key for decryption and the destination
        # key for encryption.
        "ReEncrypt": _CRYPTO,
        "GenerateDataKey": _CRYPTO,
        "GenerateDataKeyWithoutPlaintext": _CRYPTO,
        "GenerateDataKeyPair": _CRYPTO,
        "GenerateDataKeyPairWithoutPlaintext": _CRYPTO,
        "GenerateMac": _ASYMMETRIC_OR_HMAC,
        "VerifyMac": _ASYMMETRIC_OR_HMAC,
        "Sign": _ASYMMETRIC_OR_HMAC,
        "Verify": _ASYMMETRIC_OR_HMAC,
        "GetPublicKey": _ASYMMETRIC_OR_HMAC,
        # Inferred: not in the 2022 table. Follows Sign.
        "DeriveSharedSecret": _ASYMMETRIC_OR_HMAC,
        # Key lifecycle.
        "DescribeKey": _ALWAYS,
        # Inferred: a newer operation, not in the 2022 table. Botocore lists neither
        # DisabledException nor KMSInvalidStateException for it.
        "GetKeyLastUsage": _ALWAYS,
        # ✓ | ✓ | [3] | [5].
        "EnableKey": _row(ALLOWED, ALLOWED, INVALID_STATE, INVALID_STATE),
        "DisableKey": _row(ALLOWED, ALLOWED, INVALID_STATE, INVALID_STATE),
        "ScheduleKeyDeletion": _NOT_PENDING_DELETION,
        # [4] | [4] | ✓ | [4].
        "CancelKeyDeletion": _row(INVALID_STATE, INVALID_STATE, ALLOWED, INVALID_STATE),
        "UpdateKeyDescription": _NOT_PENDING_DELETION,
        # Tags.
        "TagResource": _NOT_PENDING_DELETION,
        "UntagResource": _NOT_PENDING_DELETION,
        "ListResourceTags": _ALWAYS,
        # Aliases.
        "CreateAlias": _NOT_PENDING_DELETION,
        # ✓ | ✓ | ?[10] | ✓. Footnote [10]: the call succeeds if the alias's current key is
        # pending deletion and fails with [3] if the new TargetKeyId is. Check only the new
        # target key with this row. The key the alias currently points to may be in any
        # state.
        "UpdateAlias": _NOT_PENDING_DELETION,
        "DeleteAlias": _ALWAYS,
        # Rotation.
        "EnableKeyRotation": _ROTATION_CHANGE,
        "DisableKeyRotation": _ROTATION_CHANGE,
        "GetKeyRotationStatus": _ROTATION_READ,
        # Inferred: not in the 2022 table. Follows EnableKeyRotation.
        "RotateKeyOnDemand": _ROTATION_CHANGE,
        # Inferred: not in the 2022 table. Follows GetKeyRotationStatus.
        "ListKeyRotations": _ROTATION_READ,
        # Key policies: ✓ in every state.
        "GetKeyPolicy": _ALWAYS,
        "PutKeyPolicy": _ALWAYS,
        "ListKeyPolicies": _ALWAYS,
        # Grants: CreateGrant is ✓ | [1] | [2] or [3] | [5] ([3] chosen, as for _CRYPTO).
        # The rest are ✓ in every state.
        "CreateGrant": _CRYPTO,
        "ListGrants": _ALWAYS,
        "RetireGrant": _ALWAYS,
        "RevokeGrant": _ALWAYS,
        # Imported key material.
        "GetParametersForImport": _IMPORT,
        "ImportKeyMaterial": _IMPORT,
        # ✓[9] | ✓[9] | ✓[9] | ✓ (no effect). The 2020 table had [9] as an X for
        # PendingDeletion. The 2022 table has ✓. This row follows 2022.
        "DeleteImportedKeyMaterial": _ALWAYS,
    }
)

OPERATIONS: Final = tuple(KEY_STATE_TABLE)


def key_state_outcome(operation: str, state: str) -> Outcome:
    """The table's cell: ``"Allowed"`` or the AWS error name the call gets.

    Raises KeyError for an operation or state not in the table: that is a programming
    error, not a caller's mistake.
    """
    try:
        row = KEY_STATE_TABLE[operation]
    except KeyError:
        raise KeyError(f"no key state rule for operation {operation!r}") from None
    try:
        return row[state]
    except KeyError:
        raise KeyError(f"unknown key state {state!r}") from None


def check_key_state(operation: str, state: str, arn: str) -> None:
    """Return if ``state`` allows ``operation``, else raise what AWS KMS raises.

    Raises DisabledError or KMSInvalidStateError with AWS's message. Raises KeyError for
    an operation or state not in the table.
    """
    outcome = key_state_outcome(operation, state)
    if outcome == ALLOWED:
        return
    if outcome == DISABLED_EXCEPTION:
        raise DisabledError(f"{arn} is disabled.")
    if operation == "CancelKeyDeletion":
        # Footnote [4] in every state but PendingDeletion, PendingImport included.
        raise KMSInvalidStateError(f"{arn} is not pending deletion.")
    if state == PENDING_DELETION:
        raise KMSInvalidStateError(f"{arn} is pending deletion.")
    if state == PENDING_IMPORT:
        raise KMSInvalidStateError(f"{arn} is pending import.")
    # The table refuses an Enabled or Disabled key with KMSInvalidStateException only for
    # CancelKeyDeletion, handled above.
    raise AssertionError(f"no message for {operation} in state {state}")
