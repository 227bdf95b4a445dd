"""A small, independent model of AWS KMS key lifecycle behaviour, for state-machine tests.

Pure Python, no I/O, no imports from ``ledger``: written from AWS's documentation, not
from ``ledger/domain/key_states.py``, so that a state machine driving both this model
and the real service catches a service that drifts from AWS.

Sources (AWS KMS Developer Guide and API Reference):

- Key states of AWS KMS keys (key-state.html): which state each operation accepts and
  the error it gets otherwise (footnotes [1] DisabledException, [2] DisabledException
  "is pending deletion", [3] KMSInvalidStateException "is pending deletion", [4]
  KMSInvalidStateException "is not pending deletion").
- ScheduleKeyDeletion: waiting period 7-30 days; the key turns PendingDeletion;
  "After the waiting period ends, KMS deletes the KMS key, its key material, and all
  KMS data associated with it, including all aliases that refer to it."
- CancelKeyDeletion: the key returns to Disabled.
- EnableKeyRotation: RotationPeriodInDays 90-2560, default 365; the first rotation is
  one period after the enable date. Disable automatic key rotation (rotating-keys-
  disable.html): "If you enable automatic key rotation again, AWS KMS rotates the key
  material based on the new rotation-enable date."
- How key rotation works: no rotation while a key is disabled or pending deletion; a
  re-enabled key whose rotation date has passed rotates at once.
- RotateKeyOnDemand: "On-demand rotations do not change existing automatic rotation
  schedules"; a per-key maximum of on-demand rotations (LimitExceededException).
- CreateAlias / UpdateAlias / DeleteAlias: an alias names one existing key; a duplicate
  name is AlreadyExistsException; an unknown alias is NotFoundException; footnote [10]
  of the key state table: UpdateAlias refuses a new target that is pending deletion,
  whatever state the current target is in.
- CreateGrant (refused like a cryptographic operation in Disabled/PendingDeletion; a
  named retry with identical parameters returns the same GrantId), RetireGrant and
  RevokeGrant (allowed in every key state).

Where AWS documents no precedence between two failures, or the error name is not
documented, a ``KmsError`` carries every acceptable name; each such place says so.
Only customer managed symmetric keys of origin AWS_KMS are modelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

ENABLED: Final = "Enabled"
DISABLED: Final = "Disabled"
PENDING_DELETION: Final = "PendingDeletion"

OK: Final = "ok"
NOT_FOUND: Final = "NotFoundException"
DISABLED_ERR: Final = "DisabledException"
INVALID_STATE: Final = "KMSInvalidStateException"
VALIDATION: Final = "ValidationException"
ALREADY_EXISTS: Final = "AlreadyExistsException"
LIMIT_EXCEEDED: Final = "LimitExceededException"
INVALID_GRANT_TOKEN: Final = "InvalidGrantTokenException"
INVALID_GRANT_ID: Final = "InvalidGrantIdException"

# A refused cryptographic use of a key pending deletion is [2] or [3] in AWS's table.
_CRYPTO_PENDING_DELETION = frozenset({DISABLED_ERR, INVALID_STATE})

Cell = frozenset[str]


def _row(
    enabled: str | Cell, disabled: str | Cell, pending_deletion: str | Cell
) -> tuple[Cell, ...]:
    return tuple(
        frozenset({c}) if isinstance(c, str) else c for c in (enabled, disabled, pending_deletion)
    )


# Operation -> outcome in (Enabled, Disabled, PendingDeletion): {OK} or the acceptable
# error names. Transcribed from AWS's key state table for a symmetric AWS_KMS key.
STATE_TABLE: Final[Mapping[str, tuple[Cell, ...]]] = {
    "Encrypt": _row(OK, DISABLED_ERR, _CRYPTO_PENDING_DELETION),
    "Decrypt": _row(OK, DISABLED_ERR, _CRYPTO_PENDING_DELETION),
    "CreateGrant": _row(OK, DISABLED_ERR, _CRYPTO_PENDING_DELETION),
    "DescribeKey": _row(OK, OK, OK),
    "EnableKey": _row(OK, OK, INVALID_STATE),
    "DisableKey": _row(OK, OK, INVALID_STATE),
    "ScheduleKeyDeletion": _row(OK, OK, INVALID_STATE),
    "CancelKeyDeletion": _row(INVALID_STATE, INVALID_STATE, OK),
    "CreateAlias": _row(OK, OK, INVALID_STATE),
    "UpdateAlias": _row(OK, OK, INVALID_STATE),  # the new target key only ([10])
    "DeleteAlias": _row(OK, OK, OK),
    "EnableKeyRotation": _row(OK, DISABLED_ERR, INVALID_STATE),
    "DisableKeyRotation": _row(OK, DISABLED_ERR, INVALID_STATE),
    # Not in the table's 2022 copy; the API reference lists DisabledException and
    # KMSInvalidStateException, and the rotation guide says disabled and pending
    # deletion keys are not rotated.
    "RotateKeyOnDemand": _row(OK, DISABLED_ERR, INVALID_STATE),
    "ListKeyRotations": _row(OK, OK, OK),
    "RetireGrant": _row(OK, OK, OK),
    "RevokeGrant": _row(OK, OK, OK),
}
_STATE_COLUMN: Final = {ENABLED: 0, DISABLED: 1, PENDING_DELETION: 2}


class KmsError(Exception):
    """What AWS answers: one error name, or several where AWS leaves it open."""

    def __init__(self, *names: str | Cell) -> None:
        flat: set[str] = set()
        for n in names:
            flat |= {n} if isinstance(n, str) else set(n)
        super().__init__(" or ".join(sorted(flat)))
        self.names = frozenset(flat)


@dataclass
class ModelKey:
    key_id: str
    description: str
    state: str = ENABLED
    deletion_date: datetime | None = None
    pending_window_days: int | None = None
    rotation_period_days: int | None = None
    next_rotation: datetime | None = None
    rotations: list[str] = field(default_factory=list)  # "AUTOMATIC" / "ON_DEMAND"
    grants: dict[str, str | None] = field(default_factory=dict)  # live grant id -> name
    deleted: bool = False

    @property
    def on_demand_rotations(self) -> int:
        return self.rotations.count("ON_DEMAND")


@dataclass
class KmsModel:
    """Keys and aliases of one account and region, as AWS KMS would hold them."""

    on_demand_rotation_limit: int
    keys: dict[str, ModelKey] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # alias name -> key id

    # ------------------------------------------------------------------ helpers

    def _key(self, key_id: str) -> ModelKey:
        key = self.keys.get(key_id)
        if key is None or key.deleted:
            raise KmsError(NOT_FOUND)
        return key

    def _check(self, operation: str, key: ModelKey) -> None:
        outcome = STATE_TABLE[operation][_STATE_COLUMN[key.state]]
        if outcome != {OK}:
            raise KmsError(*outcome)

    def _live(self, operation: str, key_id: str) -> ModelKey:
        key = self._key(key_id)
        self._check(operation, key)
        return key

    # ------------------------------------------------------------------ keys

    def create_key(self, *, key_id: str, description: str) -> None:
        self.keys[key_id] = ModelKey(key_id=key_id, description=description)

    def describe_key(self, key_id: str) -> dict[str, object]:
        """The DescribeKey fields the model predicts; KmsError(NotFound) once deleted."""
        key = self._live("DescribeKey", key_id)
        return {
            "KeyState": key.state,
            "Enabled": key.state == ENABLED,
            "Description": key.description,
            "DeletionDate": None if key.deletion_date is None else key.deletion_date.timestamp(),
            "PendingDeletionWindowInDays": key.pending_window_days,
        }

    def enable_key(self, key_id: str) -> None:
        self._live("EnableKey", key_id).state = ENABLED

    def disable_key(self, key_id: str) -> None:
        self._live("DisableKey", key_id).state = DISABLED

    def schedule_key_deletion(self, key_id: str, *, window_days: int, now: datetime) -> None:
        if not 7 <= window_days <= 30:  # request validation comes before any key lookup
            raise KmsError(VALIDATION)
        key = self._live("ScheduleKeyDeletion", key_id)
        key.state = PENDING_DELETION
        key.deletion_date = now + timedelta(days=window_days)
        key.pending_window_days = window_days

    def cancel_key_deletion(self, key_id: str) -> None:
        key = self._live("CancelKeyDeletion", key_id)
        key.state = DISABLED
        key.deletion_date = None
        key.pending_window_days = None

    # ------------------------------------------------------------------ rotation

    def enable_key_rotation(self, key_id: str, *, period_days: int, now: datetime) -> None:
        if not 90 <= period_days <= 2560:
            raise KmsError(VALIDATION)
        key = self._live("EnableKeyRotation", key_id)
        key.rotation_period_days = period_days
        key.next_rotation = now + timedelta(days=period_days)

    def disable_key_rotation(self, key_id: str) -> None:
        key = self._live("DisableKeyRotation", key_id)
        key.rotation_period_days = None
        key.next_rotation = None

    def rotate_key_on_demand(self, key_id: str) -> None:
        key = self._key(key_id)
        at_limit = key.on_demand_rotations >= self.on_demand_rotation_limit
        state_error = STATE_TABLE["RotateKeyOnDemand"][_STATE_COLUMN[key.state]]
        if state_error != {OK}:
            # AWS documents no precedence between the key state and the limit.
            raise KmsError(*state_error, *([LIMIT_EXCEEDED] if at_limit else []))
        if at_limit:
            raise KmsError(LIMIT_EXCEEDED)
        key.rotations.append("ON_DEMAND")  # the automatic schedule does not move

    def next_rotation_dates(self) -> list[datetime]:
        """Scheduled automatic rotations of keys that are not deleted."""
        return [k.next_rotation for k in self.keys.values() if k.next_rotation and not k.deleted]

    def list_key_rotations(self, key_id: str) -> list[str]:
        return list(self._live("ListKeyRotations", key_id).rotations)

    # ------------------------------------------------------------------ crypto

    def encrypt(self, key_id: str) -> None:
        self._live("Encrypt", key_id)

    def encrypt_via_alias(self, alias_name: str) -> str:
        target = self.aliases.get(alias_name)
        if target is None:
            raise KmsError(NOT_FOUND)
        self._live("Encrypt", target)
        return target

    def decrypt(self, key_id: str) -> None:
        """Decrypt with KeyId given; every earlier ciphertext of a usable key decrypts."""
        self._live("Decrypt", key_id)

    # ------------------------------------------------------------------ aliases

    def create_alias(self, alias_name: str, target_key_id: str) -> None:
        errors: list[str | Cell] = []
        key = self.keys.get(target_key_id)
        if key is None or key.deleted:
            errors.append(NOT_FOUND)
        else:
            cell = STATE_TABLE["CreateAlias"][_STATE_COLUMN[key.state]]
            if cell != {OK}:
                errors.append(cell)
        if alias_name in self.aliases:
            errors.append(ALREADY_EXISTS)
        if errors:  # AWS documents no precedence between these checks
            raise KmsError(*errors)
        self.aliases[alias_name] = target_key_id

    def update_alias(self, alias_name: str, target_key_id: str) -> None:
        errors: list[str | Cell] = []
        if alias_name not in self.aliases:
            errors.append(NOT_FOUND)
        key = self.keys.get(target_key_id)
        if key is None or key.deleted:
            errors.append(NOT_FOUND)
        else:
            cell = STATE_TABLE["UpdateAlias"][_STATE_COLUMN[key.state]]
            if cell != {OK}:
                errors.append(cell)
        if errors:  # AWS documents no precedence between these checks
            raise KmsError(*errors)
        self.aliases[alias_name] = target_key_id

    def delete_alias(self, alias_name: str) -> None:
        if alias_name not in self.aliases:
            raise KmsError(NOT_FOUND)
        del self.aliases[alias_name]

    # ------------------------------------------------------------------ grants

    def create_grant(self, key_id: str, *, name: str | None, grant_id: str | None) -> None:
        """CreateGrant for one fixed grantee and operation list.

        ``grant_id`` is the id the system under test returned (None if it failed); a
        named retry of a live grant must return that grant's id, anything else a new id.
        """
        key = self._live("CreateGrant", key_id)
        if grant_id is None:
            return
        repeated = [g for g, n in key.grants.items() if name is not None and n == name]
        if repeated:
            if grant_id != repeated[0]:
                raise AssertionError(f"a named CreateGrant retry returned a new id {grant_id}")
        elif grant_id in key.grants:
            raise AssertionError(f"a new grant reused the live grant id {grant_id}")
        key.grants[grant_id] = name

    def retire_grant_by_token(self, key_id: str, grant_id: str) -> None:
        # A token of a retired grant, or of a deleted key's grant: AWS names no single
        # error for it (RetireGrant lists InvalidGrantTokenException and NotFound).
        key = self.keys.get(key_id)
        if key is None or key.deleted or grant_id not in key.grants:
            raise KmsError(INVALID_GRANT_TOKEN, NOT_FOUND)
        self._check("RetireGrant", key)
        del key.grants[grant_id]

    def revoke_grant(self, key_id: str, grant_id: str) -> None:
        key = self._live("RevokeGrant", key_id)
        if grant_id not in key.grants:
            # RevokeGrant lists NotFoundException and InvalidGrantIdException; which one
            # a well-formed id of an ended grant gets is not documented.
            raise KmsError(NOT_FOUND, INVALID_GRANT_ID)
        del key.grants[grant_id]

    # ------------------------------------------------------------------ time

    def run_due(self, now: datetime) -> list[tuple[str, str]]:
        """What AWS has done by ``now``: deletions at the end of the waiting period (with
        the key's aliases and grants) and automatic rotations whose date has passed on
        enabled keys. Returns ``(event name, key id)`` pairs.

        The service runs these only when maintenance runs, so a rotation happens at
        ``now`` and the next one is one period after it.
        """
        done: list[tuple[str, str]] = []
        for key in self.keys.values():
            if key.deleted:
                continue
            if (
                key.state == PENDING_DELETION
                and key.deletion_date is not None
                and key.deletion_date <= now
            ):
                key.deleted = True
                key.grants.clear()
                for alias in [a for a, t in self.aliases.items() if t == key.key_id]:
                    del self.aliases[alias]
                done.append(("DeleteKey", key.key_id))
            elif (
                key.state == ENABLED
                and key.next_rotation is not None
                and key.rotation_period_days is not None
                and key.next_rotation <= now
            ):
                key.rotations.append("AUTOMATIC")
                key.next_rotation = now + timedelta(days=key.rotation_period_days)
                done.append(("RotateKey", key.key_id))
        return done
