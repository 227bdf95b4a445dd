"""The pure logic of KMS grants: CreateGrant validation, ids and tokens, and coverage.

Nothing here reads the clock or the RNG: grant ids and token secrets are built from
random bytes the application service passes in. The ledger stores a grant's
``GrantSpec.to_json()`` and, per issued token, only ``token_digest(secret)``; never a
token or its secret.

Sources (AWS KMS API reference and developer guide, and botocore's
``kms/2014-11-01/service-2.json``):

- CreateGrant ``Operations``: only operations the key supports ("you cannot create a
  grant for a symmetric encryption KMS key that allows the Sign operation ... KMS
  returns a ValidationError exception").
- ``GrantConstraints``: applied only to operations that take an encryption context;
  DescribeKey, RetireGrant (and CreateGrant, which has its own rule) may sit in a
  constrained grant. In a constraint "the key in each key-value pair is not case
  sensitive, but the value is case sensitive". At most 8 pairs per constraint, values
  at most 384 characters. Not allowed for asymmetric or HMAC keys.
- RetireGrant: the retiring principal, the grantee if the grant includes
  ``RetireGrant``, or the account in which the grant was created.
- CreateGrant ``Name``: a retry with identical parameters returns the original
  ``GrantId`` (with a fresh token).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import UUID

from ledger.errors import (
    InvalidGrantIdError,
    InvalidGrantTokenError,
    ValidationError,
)

JSON = dict[str, Any]

# botocore GrantOperation, in the model's order (AWS lists enum sets in this order).
GRANT_OPERATIONS: tuple[str, ...] = (
    "Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom", "ReEncryptTo", "Sign", "Verify", "GetPublicKey", "CreateGrant",
    "RetireGrant", "DescribeKey", "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext", "GenerateMac", "VerifyMac", "DeriveSharedSecret",
)  # fmt: skip

MANAGEMENT_OPERATIONS = frozenset({"CreateGrant", "RetireGrant", "DescribeKey"})
"""Grant operations valid on every key; a constraint does not apply to them."""

ENCRYPTION_CONTEXT_OPERATIONS = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "ReEncryptFrom",
        "ReEncryptTo",
    }
)
"""Operations that take an EncryptionContext (on a symmetric encryption key)."""

_SYMMETRIC_OPERATIONS = ENCRYPTION_CONTEXT_OPERATIONS
_ASYMMETRIC_ENCRYPT_OPERATIONS = frozenset(
    {"Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo", "GetPublicKey"}
)
_SIGN_OPERATIONS = frozenset({"Sign", "Verify", "GetPublicKey"})
_MAC_OPERATIONS = frozenset({"GenerateMac", "VerifyMac"})
_KEY_AGREEMENT_OPERATIONS = frozenset({"DeriveSharedSecret", "GetPublicKey"})

SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"

MAX_PRINCIPAL_LEN = 256
MAX_NAME_LEN = 256
MAX_CONSTRAINT_PAIRS = 8
MAX_CONSTRAINT_VALUE_LEN = 384
MAX_TOKEN_LEN = 8192

# Java-style patterns: \w is ASCII-only there, so re.ASCII here.
_NAME_PATTERN = "^[a-zA-Z0-9:/_-]+$"
_PRINCIPAL_PATTERN = "^[\\w+=,.@:/-]+$"
_NAME_RE = re.compile(r"[a-zA-Z0-9:/_-]+", re.ASCII)
_PRINCIPAL_RE = re.compile(r"[\w+=,.@:/-]+", re.ASCII)
_GRANT_ID_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)

GRANT_ID_RANDOM_BYTES = 32
TOKEN_SECRET_BYTES = 32
_TOKEN_VERSION = 1
_TOKEN_PAYLOAD_LEN = 1 + 16 + 32 + TOKEN_SECRET_BYTES  # 81 bytes: 108 chars, no padding


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Constraints:
    """A grant's encryption-context constraint; at most one of the two is set.

    Maps are copied on construction by ``validate_create_grant``/``from_json``; do not
    mutate them. Hashing ignores the maps (equal constraints still hash equal).
    """

    encryption_context_subset: dict[str, str] | None = field(default=None, hash=False)
    encryption_context_equals: dict[str, str] | None = field(default=None, hash=False)

    def to_json(self) -> JSON:
        out: JSON = {}
        if self.encryption_context_subset is not None:
            out["EncryptionContextSubset"] = dict(self.encryption_context_subset)
        if self.encryption_context_equals is not None:
            out["EncryptionContextEquals"] = dict(self.encryption_context_equals)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Constraints:
        subset = data.get("EncryptionContextSubset")
        equals = data.get("EncryptionContextEquals")
        return cls(
            encryption_context_subset=None if subset is None else dict(subset),
            encryption_context_equals=None if equals is None else dict(equals),
        )


@dataclass(frozen=True)
class GrantSpec:
    """What a grant allows: the validated CreateGrant parameters plus its key and issuer.

    ``operations`` is sorted and deduplicated. ``issuing_account`` is the ARN of the
    account root principal in which the grant was created
    (``arn:aws:iam::111122223333:root``), as ListGrants shows in ``IssuingAccount``.
    """

    key_arn: str
    grantee_principal: str
    retiring_principal: str | None
    operations: tuple[str, ...]
    constraints: Constraints | None
    name: str | None
    issuing_account: str

    def to_json(self) -> JSON:
        """Plain JSON with AWS field names (``KeyId`` holds the key ARN, as ListGrants)."""
        out: JSON = {
            "KeyId": self.key_arn,
            "GranteePrincipal": self.grantee_principal,
            "Operations": list(self.operations),
            "IssuingAccount": self.issuing_account,
        }
        if self.retiring_principal is not None:
            out["RetiringPrincipal"] = self.retiring_principal
        if self.constraints is not None:
            out["Constraints"] = self.constraints.to_json()
        if self.name is not None:
            out["Name"] = self.name
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GrantSpec:
        constraints = data.get("Constraints")
        return cls(
            key_arn=str(data["KeyId"]),
            grantee_principal=str(data["GranteePrincipal"]),
            retiring_principal=data.get("RetiringPrincipal"),
            operations=tuple(sorted(set(data["Operations"]))),
            constraints=None if constraints is None else Constraints.from_json(constraints),
            name=data.get("Name"),
            issuing_account=str(data["IssuingAccount"]),
        )


# ---------------------------------------------------------------------- validation


def _shape_error(field_name: str, constraint: str, value: object) -> str:
    return f"Value '{value}' at '{field_name}' failed to satisfy constraint: {constraint}"


def _raise_shape_errors(errors: list[str]) -> None:
    """Raise one ValidationError in AWS's "N validation error(s) detected" format."""
    if not errors:
        return
    noun = "error" if len(errors) == 1 else "errors"
    raise ValidationError(f"{len(errors)} validation {noun} detected: " + "; ".join(errors))


def _check_string(
    errors: list[str], field_name: str, value: object, pattern: str, regex: re.Pattern[str]
) -> None:
    if not isinstance(value, str):
        errors.append(_shape_error(field_name, "Member must be a string", value))
    elif len(value) < 1:
        errors.append(
            _shape_error(field_name, "Member must have length greater than or equal to 1", value)
        )
    elif len(value) > MAX_PRINCIPAL_LEN:  # the same 256 for names and principals
        errors.append(
            _shape_error(field_name, "Member must have length less than or equal to 256", value)
        )
    elif regex.fullmatch(value) is None:
        errors.append(
            _shape_error(
                field_name, f"Member must satisfy regular expression pattern: {pattern}", value
            )
        )


def allowed_grant_operations(key_spec: str, key_usage: str) -> frozenset[str]:
    """The grant operations a key of this spec and usage supports (developer guide,
    "Key type reference"); the management operations are valid on every key."""
    if key_spec == SYMMETRIC_DEFAULT:
        extra = _SYMMETRIC_OPERATIONS
    elif key_usage == "GENERATE_VERIFY_MAC":
        extra = _MAC_OPERATIONS
    elif key_usage == "ENCRYPT_DECRYPT":
        extra = _ASYMMETRIC_ENCRYPT_OPERATIONS
    elif key_usage == "SIGN_VERIFY":
        extra = _SIGN_OPERATIONS
    elif key_usage == "KEY_AGREEMENT":
        extra = _KEY_AGREEMENT_OPERATIONS
    else:
        extra = frozenset()
    return MANAGEMENT_OPERATIONS | extra


def _context_map(errors: list[str], field_name: str, value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        errors.append(_shape_error(field_name, "Member must be a map of strings", "..."))
        return None
    return dict(value)


def _validate_constraints(
    errors: list[str], raw: Mapping[str, Any] | None
) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    if raw is None:
        return None, None
    if not isinstance(raw, Mapping):
        errors.append(_shape_error("constraints", "Member must be a structure", "..."))
        return None, None
    unknown = sorted(set(raw) - {"EncryptionContextSubset", "EncryptionContextEquals"})
    if unknown:
        errors.append(_shape_error("constraints", "Member must not have unknown fields", unknown))
    subset = _context_map(
        errors, "constraints.encryptionContextSubset", raw.get("EncryptionContextSubset")
    )
    equals = _context_map(
        errors, "constraints.encryptionContextEquals", raw.get("EncryptionContextEquals")
    )
    return subset, equals


def validate_create_grant(
    *,
    key_arn: str,
    key_spec: str,
    key_usage: str,
    issuing_account: str,
    grantee_principal: object,
    operations: object,
    retiring_principal: object = None,
    constraints: Mapping[str, Any] | None = None,
    name: object = None,
) -> GrantSpec:
    """Validate CreateGrant parameters for the resolved key; return the grant to record.

    ``constraints`` is the request's ``Constraints`` structure as sent (AWS field
    names). Raises ValidationError: first for shape violations (all of them, in AWS's
    "N validation errors detected: ..." form), then for the first semantic rule broken.
    The caller resolves ``KeyId`` and checks the key state before calling.
    """
    errors: list[str] = []
    _check_string(errors, "granteePrincipal", grantee_principal, _PRINCIPAL_PATTERN, _PRINCIPAL_RE)
    if retiring_principal is not None:
        _check_string(
            errors, "retiringPrincipal", retiring_principal, _PRINCIPAL_PATTERN, _PRINCIPAL_RE
        )
    if name is not None:
        _check_string(errors, "name", name, _NAME_PATTERN, _NAME_RE)

    ops: list[str] = []
    if not isinstance(operations, Sequence) or isinstance(operations, str | bytes):
        errors.append(_shape_error("operations", "Member must be a list", "..."))
    elif not operations:
        errors.append(
            _shape_error("operations", "Member must have length greater than or equal to 1", [])
        )
    else:
        bad = [op for op in operations if not isinstance(op, str) or op not in GRANT_OPERATIONS]
        if bad:
            shown = "[" + ", ".join(str(op) for op in operations) + "]"
            errors.append(
                _shape_error(
                    "operations",
                    "Member must satisfy constraint: [Member must satisfy enum value set: ["
                    + ", ".join(GRANT_OPERATIONS)
                    + "]]",
                    shown,
                )
            )
        else:
            ops = sorted(set(operations))

    subset, equals = _validate_constraints(errors, constraints)
    _raise_shape_errors(errors)

    # Semantic rules (plain messages, as AWS gives for non-shape ValidationExceptions).
    if ops == ["CreateGrant"]:
        raise ValidationError("Grants must not contain only the CreateGrant operation.")
    allowed = allowed_grant_operations(key_spec, key_usage)
    invalid = [op for op in ops if op not in allowed]
    if invalid:
        raise ValidationError(
            f"Grant operations [{', '.join(invalid)}] are not valid for a KMS key with "
            f"KeySpec {key_spec} and KeyUsage {key_usage}."
        )
    subset = subset or None  # an empty map is treated as not specified
    equals = equals or None
    if subset is not None and equals is not None:
        raise ValidationError(
            "A grant constraint can specify EncryptionContextSubset or "
            "EncryptionContextEquals, not both."
        )
    given = subset if subset is not None else equals
    if given is not None:
        if key_spec != SYMMETRIC_DEFAULT:
            raise ValidationError(
                "Encryption context grant constraints are supported only for symmetric "
                f"encryption KMS keys, not for KeySpec {key_spec}."
            )
        if len(given) > MAX_CONSTRAINT_PAIRS:
            raise ValidationError(
                f"A grant constraint can include at most {MAX_CONSTRAINT_PAIRS} "
                "encryption context pairs."
            )
        if any(len(v) > MAX_CONSTRAINT_VALUE_LEN for v in given.values()):
            raise ValidationError(
                "An encryption context value in a grant constraint cannot exceed "
                f"{MAX_CONSTRAINT_VALUE_LEN} characters."
            )
    return GrantSpec(
        key_arn=key_arn,
        grantee_principal=cast(str, grantee_principal),  # checked above
        retiring_principal=retiring_principal if isinstance(retiring_principal, str) else None,
        operations=tuple(ops),
        constraints=(
            None
            if given is None
            else Constraints(encryption_context_subset=subset, encryption_context_equals=equals)
        ),
        name=name if isinstance(name, str) else None,
        issuing_account=issuing_account,
    )


# -------------------------------------------------------------------- ids and tokens


def new_grant_id(random32: bytes) -> str:
    """A grant id: 64 lowercase hex characters from 32 random bytes, like AWS's."""
    if len(random32) != GRANT_ID_RANDOM_BYTES:
        raise ValueError("a grant id needs exactly 32 random bytes")
    return random32.hex()


def check_grant_id(grant_id: object) -> str:
    """Return ``grant_id`` if it is a well-formed grant id, else raise InvalidGrantIdError.

    A well-formed id of no grant is the caller's NotFoundError, not this one.
    """
    if not isinstance(grant_id, str) or _GRANT_ID_RE.fullmatch(grant_id) is None:
        raise InvalidGrantIdError("Invalid grant ID.")
    return grant_id


def make_grant_token(key_id: UUID, grant_id: str, secret: bytes) -> str:
    """An opaque URL-safe base64 token binding the key id, the grant id and a secret.

    Layout before encoding: version (1 byte) | key id (16) | grant id (32) | secret
    (32); 81 bytes, so 108 characters with no padding. The token is a bearer
    credential: return it to the caller and store only ``token_digest(secret)``.
    """
    check_grant_id(grant_id)
    if len(secret) != TOKEN_SECRET_BYTES:
        raise ValueError("a grant token secret is exactly 32 bytes")
    payload = bytes([_TOKEN_VERSION]) + key_id.bytes + bytes.fromhex(grant_id) + secret
    return base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=")


def parse_grant_token(token: object) -> tuple[UUID, str, bytes]:
    """Return ``(key_id, grant_id, secret)`` from a token, or raise InvalidGrantTokenError.

    Only the canonical encoding ``make_grant_token`` produces is accepted, so two
    different strings never parse to the same triple. Parsing proves nothing: the
    caller must still look the grant up and compare ``token_digest(secret)``.
    """
    if (
        not isinstance(token, str)
        or not 1 <= len(token) <= MAX_TOKEN_LEN
        or _TOKEN_RE.fullmatch(token) is None
    ):
        raise InvalidGrantTokenError("Invalid grant token.")
    try:
        payload = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidGrantTokenError("Invalid grant token.") from None
    if (
        len(payload) != _TOKEN_PAYLOAD_LEN
        or payload[0] != _TOKEN_VERSION
        or base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=") != token
    ):
        raise InvalidGrantTokenError("Invalid grant token.")
    return UUID(bytes=payload[1:17]), payload[17:49].hex(), payload[49:]


def token_digest(secret: bytes) -> str:
    """Hex SHA-256 of a token secret: the only form of a token the ledger stores."""
    return hashlib.sha256(secret).hexdigest()


def verify_token_secret(secret: bytes, digests: Iterable[str]) -> None:
    """Raise InvalidGrantTokenError unless ``secret`` matches one of the stored digests.

    Compares in constant time per digest.
    """
    mine = token_digest(secret)
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(mine, digest)
    if not matched:
        raise InvalidGrantTokenError("Invalid grant token.")


# ------------------------------------------------------------------------- coverage


def _pairs(context: Mapping[str, str]) -> Counter[tuple[str, str]]:
    """Context pairs with keys compared case-insensitively and values exactly."""
    return Counter((k.lower(), v) for k, v in context.items())


def context_satisfies(constraints: Constraints, context: Mapping[str, str] | None) -> bool:
    """Whether a request's encryption context meets a grant constraint.

    Keys compare case-insensitively, values case-sensitively (GrantConstraints). Subset:
    every constraint pair is in the request (extra request pairs allowed). Equals: the
    request has exactly the constraint's pairs, counted as a multiset, so a request
    with keys differing only by case never equals a constraint with one such key.
    """
    request = _pairs(context or {})
    if constraints.encryption_context_equals is not None:
        return request == _pairs(constraints.encryption_context_equals)
    if constraints.encryption_context_subset is not None:
        return set(_pairs(constraints.encryption_context_subset)) <= set(request)
    return True


def grant_allows(
    grant: GrantSpec,
    *,
    operation: str,
    principal: str,
    encryption_context: Mapping[str, str] | None,
) -> bool:
    """Whether ``grant`` lets ``principal`` call ``operation`` with this context.

    The grantee must match exactly and the operation be in the grant. A constraint
    applies to operations that take an encryption context; DescribeKey, RetireGrant
    and CreateGrant ignore it (for CreateGrant the caller must also check
    ``constraints_at_least_as_strict`` on the new grant). Any other operation under a
    constrained grant is denied (validation never creates one; fail closed).
    """
    if principal != grant.grantee_principal or operation not in grant.operations:
        return False
    if grant.constraints is None or operation in MANAGEMENT_OPERATIONS:
        return True
    if operation not in ENCRYPTION_CONTEXT_OPERATIONS:
        return False
    return context_satisfies(grant.constraints, encryption_context)


def constraints_at_least_as_strict(parent: Constraints | None, child: Constraints | None) -> bool:
    """Whether a grant created through a constrained grant's CreateGrant is allowed.

    AWS: the new grant must have "an equally strict or stricter encryption context
    constraint". Read here as: every context the child allows, the parent allows.
    Parent Equals E: child Equals E. Parent Subset S: child Subset or Equals that
    contains every pair of S. Keys compare case-insensitively, as in matching.
    """
    if parent is None:
        return True
    if child is None:
        return False
    if parent.encryption_context_equals is not None:
        return child.encryption_context_equals is not None and _pairs(
            child.encryption_context_equals
        ) == _pairs(parent.encryption_context_equals)
    if parent.encryption_context_subset is not None:
        given = child.encryption_context_equals or child.encryption_context_subset or {}
        return set(_pairs(parent.encryption_context_subset)) <= set(_pairs(given))
    return True


def can_retire(grant: GrantSpec, principal: str) -> bool:
    """Whether ``principal`` may RetireGrant this grant, by the grant alone.

    True for the retiring principal, for the grantee if the grant includes
    RetireGrant, and for the issuing account's root principal. Principals to whom the
    account delegated retirement through policy are the service's policy decision.
    """
    return (
        principal == grant.retiring_principal
        or (principal == grant.grantee_principal and "RetireGrant" in grant.operations)
        or principal == grant.issuing_account
    )


def same_grant(a: GrantSpec, b: GrantSpec) -> bool:
    """Whether a named CreateGrant retry ``b`` repeats grant ``a`` (returns a's id).

    Requires a name on both and identical parameters (case-sensitive constraint maps).
    """
    return a.name is not None and a == b


def find_same_grant(existing: Iterable[tuple[str, GrantSpec]], spec: GrantSpec) -> str | None:
    """The id of a live grant that ``spec`` repeats (CreateGrant Name idempotency)."""
    for grant_id, grant in existing:
        if same_grant(grant, spec):
            return grant_id
    return None


# ------------------------------------------------------------------------- listings


def list_grants(
    grants: Iterable[tuple[str, GrantSpec]],
    *,
    grant_id: str | None = None,
    grantee_principal: str | None = None,
) -> list[tuple[str, GrantSpec]]:
    """ListGrants filters over one key's live grants, in the given order.

    A ``grant_id`` filter must be well formed (InvalidGrantIdError otherwise).
    """
    if grant_id is not None:
        check_grant_id(grant_id)
    return [
        (gid, g)
        for gid, g in grants
        if (grant_id is None or gid == grant_id)
        and (grantee_principal is None or g.grantee_principal == grantee_principal)
    ]


def list_retirable_grants(
    grants: Iterable[tuple[str, GrantSpec]], *, retiring_principal: str
) -> list[tuple[str, GrantSpec]]:
    """ListRetirableGrants: live grants whose retiring principal is exactly this one."""
    return [(gid, g) for gid, g in grants if g.retiring_principal == retiring_principal]
