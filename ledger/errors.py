"""Internal errors of the KMS operations service.

Each maps to one AWS KMS error name (``aws_name``); ``api/`` and ``cli/`` use that
table to answer callers. Messages never contain key material, plaintext, ciphertext
blobs, signatures or grant tokens.
"""

from __future__ import annotations


class KeyLedgerError(Exception):
    """Base of every error a KMS operation raises on purpose."""

    aws_name = "KMSInternalException"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(KeyLedgerError):
    aws_name = "NotFoundException"


class DisabledError(KeyLedgerError):
    aws_name = "DisabledException"


class KMSInvalidStateError(KeyLedgerError):
    aws_name = "KMSInvalidStateException"


class InvalidCiphertextError(KeyLedgerError):
    """Any failed decryption: bad tag, wrong context, wrong key, malformed blob.

    Deliberately one error with no detail, so callers cannot tell which.
    """

    aws_name = "InvalidCiphertextException"


class IncorrectKeyError(KeyLedgerError):
    aws_name = "IncorrectKeyException"


class ValidationError(KeyLedgerError):
    aws_name = "ValidationException"


class InvalidKeyUsageError(KeyLedgerError):
    aws_name = "InvalidKeyUsageException"


class UnsupportedOperationError(KeyLedgerError):
    aws_name = "UnsupportedOperationException"


class LedgerUnavailableError(KeyLedgerError):
    """The ledger could not commit the event: the operation failed closed."""

    aws_name = "KMSInternalException"


class HsmError(KeyLedgerError):
    """The HSM refused or failed an operation (not a decryption failure)."""

    aws_name = "KMSInternalException"


class AlreadyExistsError(KeyLedgerError):
    aws_name = "AlreadyExistsException"


class LimitExceededError(KeyLedgerError):
    aws_name = "LimitExceededException"


class TagError(KeyLedgerError):
    aws_name = "TagException"


class InvalidMarkerError(KeyLedgerError):
    aws_name = "InvalidMarkerException"


class InvalidAliasNameError(KeyLedgerError):
    aws_name = "InvalidAliasNameException"


class MalformedPolicyDocumentError(KeyLedgerError):
    aws_name = "MalformedPolicyDocumentException"


class InvalidArnError(KeyLedgerError):
    aws_name = "InvalidArnException"


class NotAuthorizedError(KeyLedgerError):
    aws_name = "NotAuthorizedException"


class InvalidImportTokenError(KeyLedgerError):
    aws_name = "InvalidImportTokenException"


class ExpiredImportTokenError(KeyLedgerError):
    aws_name = "ExpiredImportTokenException"


class KMSInvalidMacError(KeyLedgerError):
    aws_name = "KMSInvalidMacException"


class KMSInvalidSignatureError(KeyLedgerError):
    aws_name = "KMSInvalidSignatureException"


class TamperError(Exception):
    """Chain verification found a bad position.

    ``position`` is the 1-based ledger sequence number of the first bad record.
    """

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"position {position}: {reason}")
        self.position = position
        self.reason = reason


class InvalidGrantTokenError(KeyLedgerError):
    """A grant token that is malformed or names no live grant.

    The message never contains the token.
    """

    aws_name = "InvalidGrantTokenException"


class InvalidGrantIdError(KeyLedgerError):
    """A ``GrantId`` that is not a well-formed grant id."""

    aws_name = "InvalidGrantIdException"


class AccessDeniedError(KeyLedgerError):
    """The caller is authenticated but no policy or grant allows the action."""

    aws_name = "AccessDeniedException"


class AuthError(KeyLedgerError):
    """A request that failed authentication (HTTP 400/403 as AWS answers)."""

    http_status = 403


class MissingAuthenticationTokenError(AuthError):
    aws_name = "MissingAuthenticationTokenException"


class IncompleteSignatureError(AuthError):
    aws_name = "IncompleteSignatureException"


class InvalidSignatureError(AuthError):
    """A SigV4 signature that does not match (AWS: InvalidSignatureException)."""

    aws_name = "InvalidSignatureException"


class UnrecognizedClientError(AuthError):
    aws_name = "UnrecognizedClientException"


class SerializationError(KeyLedgerError):
    """A request body that is not the JSON the operation's shape allows."""

    aws_name = "SerializationException"


class DryRunOperationError(KeyLedgerError):
    """A DryRun request that would have succeeded (nothing was done)."""

    aws_name = "DryRunOperationException"


class UnknownOperationError(KeyLedgerError):
    aws_name = "UnknownOperationException"


class PrincipalError(KeyLedgerError):
    """Bad principal management input (IAM-style names)."""

    aws_name = "ValidationException"


AWS_ERROR_NAMES: dict[type[KeyLedgerError], str] = {
    cls: cls.aws_name
    for cls in (
        KeyLedgerError,
        NotFoundError,
        DisabledError,
        KMSInvalidStateError,
        InvalidCiphertextError,
        IncorrectKeyError,
        ValidationError,
        InvalidKeyUsageError,
        UnsupportedOperationError,
        LedgerUnavailableError,
        HsmError,
        AlreadyExistsError,
        LimitExceededError,
        TagError,
        InvalidMarkerError,
        InvalidAliasNameError,
        MalformedPolicyDocumentError,
        InvalidArnError,
        InvalidGrantTokenError,
        InvalidGrantIdError,
        NotAuthorizedError,
        KMSInvalidMacError,
        KMSInvalidSignatureError,
        InvalidImportTokenError,
        ExpiredImportTokenError,
        AccessDeniedError,
        MissingAuthenticationTokenError,
        IncompleteSignatureError,
        InvalidSignatureError,
        UnrecognizedClientError,
        SerializationError,
        UnknownOperationError,
        DryRunOperationError,
    )
}
