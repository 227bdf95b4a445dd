"""The KMS operations service: AWS KMS verbs over the key ledger and the keystore.

Promise 1, no crypto without a record: every result is returned only after its event
is committed; if the commit fails the call raises LedgerUnavailableError and the
result is discarded. Every failed or denied attempt is recorded as ``ApiCall.Failed``
with its AWS error code, then the error is raised. Failures change no key state.

Security: plaintext, ciphertext blobs and key material never reach events, logs or
exception messages; events hold only the caller's parameters that AWS CloudTrail
would show (key id as sent, encryption context, algorithm).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, Mapper

from ledger import envelope
from ledger.clock import Clock, SystemClock
from ledger.domain.model import ApiCall, CallContext, Key
from ledger.errors import (
    DisabledError,
    IncorrectKeyError,
    InvalidCiphertextError,
    KeyLedgerError,
    LedgerUnavailableError,
    NotFoundError,
    UnsupportedOperationError,
    ValidationError,
)
from ledger.groupcommit import GroupCommitter
from ledger.keystore.port import KeyStore
from ledger.persistence import CanonicalMapper, LedgerDatabase
from ledger.settings import Settings

T = TypeVar("T")
JSON = dict[str, Any]

MAX_PLAINTEXT = 4096
MAX_CIPHERTEXT = 6144
MAX_DESCRIPTION = 8192
SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
KEY_SPECS = (
    "RSA_2048", "RSA_3072", "RSA_4096", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521",
    "ECC_SECG_P256K1", "SYMMETRIC_DEFAULT", "HMAC_224", "HMAC_256", "HMAC_384", "HMAC_512",
    "SM2",
)  # fmt: skip
KEY_USAGES = ("SIGN_VERIFY", "ENCRYPT_DECRYPT", "GENERATE_VERIFY_MAC", "KEY_AGREEMENT")
ORIGINS = ("AWS_KMS", "EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE")
ENCRYPTION_ALGORITHMS = ("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "SM2PKE")
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_ARN_RE = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):(\d{12}):key/(.+)$")


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the transport knows it (CLI user, SigV4 principal)."""

    principal: str
    source_ip: str | None = None
    user_agent: str | None = None


def validation_error(field: str, constraint: str, value: object | None = None) -> ValidationError:
    shown = "" if value is None else f" '{value}'"
    return ValidationError(
        f"1 validation error detected: Value{shown} at '{field}' failed to satisfy "
        f"constraint: {constraint}"
    )


def enum_error(field: str, value: str, allowed: tuple[str, ...]) -> ValidationError:
    constraint = "Member must satisfy enum value set: [" + ", ".join(allowed) + "]"
    return validation_error(field, constraint, value)


class _Attempt:
    """What a call learned before it failed (the resolved key ARN)."""

    def __init__(self) -> None:
        self.key_arn: str | None = None


class KeyLedger(Application[UUID]):
    """The eventsourcing application behind every KMS operation.

    Construct through ``ledger.bootstrap.open_ledger``. All public methods are
    thread-safe; each raises a KeyLedgerError subclass on bad input.
    """

    name = "KeyLedger"

    def __init__(
        self,
        *,
        settings: Settings,
        keystore: KeyStore,
        env: Mapping[str, str],
        clock: Clock | None = None,
    ) -> None:
        full_env = {"AGGREGATE_CACHE_MAXSIZE": "10000", **env}
        super().__init__(full_env)
        self.settings = settings
        self.keystore = keystore
        self.clock: Clock = clock or SystemClock()
        self.db = LedgerDatabase(self.recorder)
        self._ledger_id: str | None = None
        self._id_lock = threading.Lock()
        self._group = GroupCommitter(self.save)

    def construct_mapper(self) -> Mapper[UUID]:
        return CanonicalMapper()

    # ----------------------------------------------------------------- helpers

    def _call(self, operation: str, caller: Caller) -> CallContext:
        return CallContext(
            operation=operation,
            request_id=str(uuid.uuid4()),
            principal=caller.principal,
            region=self.settings.region,
            account_id=self.settings.account_id,
            source_ip=caller.source_ip,
            user_agent=caller.user_agent,
        )

    def _commit(self, *objs: Any) -> None:
        try:
            self.save(*objs)
        except Exception as exc:  # fail closed: no record, no result
            raise LedgerUnavailableError("The ledger could not record the request.") from exc

    def _commit_call(self, call_record: ApiCall) -> None:
        """Store an ApiCall record through group commit (its id never conflicts)."""
        try:
            self._group.commit(call_record)
        except Exception as exc:  # fail closed: no record, no result
            raise LedgerUnavailableError("The ledger could not record the request.") from exc

    def _run(
        self,
        operation: str,
        caller: Caller,
        request: JSON,
        body: Callable[[CallContext, _Attempt], T],
        *,
        read_only: bool,
    ) -> T:
        call = self._call(operation, caller)
        attempt = _Attempt()
        try:
            return body(call, attempt)
        except LedgerUnavailableError:
            raise
        except KeyLedgerError as err:
            failure = ApiCall.failed(
                call=call,
                timestamp=self.clock.now(),
                key_arn=attempt.key_arn,
                request=request,
                error_code=err.aws_name,
                error_message=err.message,
                read_only=read_only,
            )
            self._commit_call(failure)
            raise

    def record_rejected(
        self, *, operation: str, caller: Caller, request: JSON, error: KeyLedgerError
    ) -> None:
        """Record a request the transport rejected before calling the operation
        (e.g. a malformed CLI ``--context``), so every failed attempt is in the log.

        Raises LedgerUnavailableError when the record cannot be committed.
        """
        call = self._call(operation, caller)
        self._commit_call(
            ApiCall.failed(
                call=call,
                timestamp=self.clock.now(),
                key_arn=None,
                request=request,
                error_code=error.aws_name,
                error_message=error.message,
                read_only=operation in ("Encrypt", "Decrypt"),
            )
        )

    def resolve_key_id(self, key_id: str) -> UUID:
        """A key id or key ARN to the key's UUID (existence is not checked).

        Raises NotFoundError for aliases (not supported yet), malformed ids and ARNs
        of another account or region, and ValidationError for an empty id.
        """
        if not key_id:
            raise validation_error("keyId", "Member must have length greater than or equal to 1")
        if len(key_id) > 2048:
            raise validation_error("keyId", "Member must have length less than or equal to 2048")
        if key_id.startswith("alias/") or ":alias/" in key_id:
            raise NotFoundError(f"Alias {key_id} is not found.")
        m = _ARN_RE.match(key_id)
        if m:
            region, account, rest = m.groups()
            if region != self.settings.region or account != self.settings.account_id:
                raise NotFoundError(f"Invalid arn {region}")
            if not _UUID_RE.match(rest):
                raise NotFoundError(f"Invalid keyId '{rest}'")
            return UUID(rest)
        if key_id.startswith("arn:"):
            raise NotFoundError(f"Invalid arn {key_id}")
        if not _UUID_RE.match(key_id):
            raise NotFoundError(f"Invalid keyId '{key_id}'")
        return UUID(key_id)

    def load_key(self, key_uuid: UUID) -> Key:
        """The current state of a key; raises NotFoundError when it does not exist."""
        agg: object
        try:
            agg = self.repository.get(key_uuid)
        except AggregateNotFoundError:
            agg = None
        if not isinstance(agg, Key):
            raise NotFoundError(f"Key '{self.settings.key_arn(str(key_uuid))}' does not exist")
        return agg

    def _key_for(self, key_id: str, attempt: _Attempt) -> Key:
        key = self.load_key(self.resolve_key_id(key_id))
        attempt.key_arn = key.arn
        return key

    @staticmethod
    def _check_context(context: Mapping[str, str] | None) -> dict[str, str]:
        if context is None:
            return {}
        if not isinstance(context, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in context.items()
        ):
            raise ValidationError("EncryptionContext must map strings to strings.")
        if any(not k for k in context):
            raise ValidationError("EncryptionContext keys must not be empty.")
        return dict(context)

    @staticmethod
    def _check_algorithm(algorithm: str | None) -> str:
        algorithm = algorithm or SYMMETRIC_DEFAULT
        if algorithm not in ENCRYPTION_ALGORITHMS:
            raise enum_error("encryptionAlgorithm", algorithm, ENCRYPTION_ALGORITHMS)
        return algorithm

    def metadata(self, key: Key) -> JSON:
        """DescribeKey's KeyMetadata for a loaded key (AWS response shape)."""
        return {
            "AWSAccountId": self.settings.account_id,
            "KeyId": key.key_id,
            "Arn": key.arn,
            "CreationDate": key.created_on.timestamp(),
            "Enabled": key.enabled,
            "Description": key.description,
            "KeyUsage": key.key_usage,
            "KeyState": key.key_state,
            "Origin": key.origin,
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": key.key_spec,
            "KeySpec": key.key_spec,
            "EncryptionAlgorithms": [SYMMETRIC_DEFAULT],
            "MultiRegion": False,
        }

    @property
    def ledger_id(self) -> str:
        """A stable id for this ledger: ``kl-`` and the first record's hash prefix.

        Raises NotFoundError while the ledger is empty.
        """
        with self._id_lock:
            if self._ledger_id is None:
                first = self.db.read_records(0, 1)
                if not first:
                    raise NotFoundError("The ledger is empty.")
                self._ledger_id = "kl-" + first[0].record_hash.hex()[:32]
            return self._ledger_id

    # -------------------------------------------------------------- operations

    def create_key(
        self,
        *,
        caller: Caller,
        description: str = "",
        key_usage: str | None = None,
        key_spec: str | None = None,
        origin: str | None = None,
    ) -> JSON:
        """CreateKey. Only SYMMETRIC_DEFAULT / ENCRYPT_DECRYPT / AWS_KMS for now.

        Raises ValidationError for values outside AWS's enums or limits and
        UnsupportedOperationError for valid ones this version cannot yet create.
        """
        request: JSON = {
            "description": description,
            "keySpec": key_spec or SYMMETRIC_DEFAULT,
            "keyUsage": key_usage or "ENCRYPT_DECRYPT",
            "origin": origin or "AWS_KMS",
        }

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            if len(description) > MAX_DESCRIPTION:
                raise validation_error(
                    "description", "Member must have length less than or equal to 8192"
                )
            spec, usage, orig = request["keySpec"], request["keyUsage"], request["origin"]
            if spec not in KEY_SPECS:
                raise enum_error("keySpec", spec, KEY_SPECS)
            if usage not in KEY_USAGES:
                raise enum_error("keyUsage", usage, KEY_USAGES)
            if orig not in ORIGINS:
                raise enum_error("origin", orig, ORIGINS)
            if spec == SYMMETRIC_DEFAULT and usage != "ENCRYPT_DECRYPT":
                raise ValidationError(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
            if spec != SYMMETRIC_DEFAULT or orig != "AWS_KMS":
                raise UnsupportedOperationError(
                    f"KeySpec {spec} with origin {orig} is not supported by this KeyLedger version."
                )
            material = self.keystore.generate_symmetric_key()
            key_uuid = uuid.uuid4()
            arn = self.settings.key_arn(str(key_uuid))
            attempt.key_arn = arn
            key = Key.create(
                key_id=key_uuid,
                arn=arn,
                call=call,
                timestamp=self.clock.now(),
                description=description,
                key_spec=spec,
                key_usage=usage,
                origin=orig,
                material=material,
                request=request,
            )
            self._commit(key)
            return {"KeyMetadata": self.metadata(key)}

        return self._run("CreateKey", caller, request, body, read_only=False)

    def _set_enabled(self, operation: str, key_id: str, caller: Caller, enabled: bool) -> JSON:
        request: JSON = {"keyId": key_id}

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            for _ in range(5):  # another writer may have moved the key on: reload, retry
                key = self._key_for(key_id, attempt)
                if enabled:
                    key.enable(call=call, timestamp=self.clock.now(), request=request)
                else:
                    key.disable(call=call, timestamp=self.clock.now(), request=request)
                try:
                    self.save(key)
                except IntegrityError:
                    continue
                except Exception as exc:
                    raise LedgerUnavailableError(
                        "The ledger could not record the request."
                    ) from exc
                return {}
            raise LedgerUnavailableError("The key kept changing; the request was not recorded.")

        return self._run(operation, caller, request, body, read_only=False)

    def enable_key(self, *, caller: Caller, key_id: str) -> JSON:
        """EnableKey. Raises NotFoundError, KMSInvalidStateError."""
        return self._set_enabled("EnableKey", key_id, caller, True)

    def disable_key(self, *, caller: Caller, key_id: str) -> JSON:
        """DisableKey. Raises NotFoundError, KMSInvalidStateError."""
        return self._set_enabled("DisableKey", key_id, caller, False)

    def encrypt(
        self,
        *,
        caller: Caller,
        key_id: str,
        plaintext: bytes,
        encryption_context: Mapping[str, str] | None = None,
        encryption_algorithm: str | None = None,
    ) -> JSON:
        """Encrypt up to 4096 bytes under a symmetric key inside the HSM.

        Returns ``{"CiphertextBlob", "KeyId", "EncryptionAlgorithm"}`` only after the
        Encrypt event is committed. Raises ValidationError, NotFoundError,
        DisabledError, KMSInvalidStateError, LedgerUnavailableError.
        """
        request: JSON = {
            "keyId": key_id,
            "encryptionAlgorithm": encryption_algorithm or SYMMETRIC_DEFAULT,
        }
        if isinstance(encryption_context, Mapping):
            request["encryptionContext"] = dict(encryption_context)

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            context = self._check_context(encryption_context)
            algorithm = self._check_algorithm(encryption_algorithm)
            if not isinstance(plaintext, bytes | bytearray) or len(plaintext) < 1:
                raise validation_error(
                    "plaintext", "Member must have length greater than or equal to 1"
                )
            if len(plaintext) > MAX_PLAINTEXT:
                raise validation_error(
                    "plaintext", "Member must have length less than or equal to 4096"
                )
            key = self._key_for(key_id, attempt)
            self._check_usable(key)
            if algorithm != SYMMETRIC_DEFAULT:
                raise IncorrectKeyError(
                    "The key ID in the request does not identify a CMK that can perform "
                    "this operation."
                )
            material = key.current_material
            version = key.version_number
            key_uuid = UUID(key.key_id)
            iv, ct = self.keystore.encrypt(
                material, bytes(plaintext), envelope.aad(key_uuid, version, context)
            )
            blob = envelope.Envelope(key_id=key_uuid, version=version, iv=iv, ciphertext=ct)
            self._commit_call(
                ApiCall.succeeded(
                    call=call,
                    timestamp=self.clock.now(),
                    key_arn=key.arn,
                    request=request,
                    additional={"keyMaterialId": material.material_id},
                )
            )
            return {
                "CiphertextBlob": blob.to_bytes(),
                "KeyId": key.arn,
                "EncryptionAlgorithm": algorithm,
            }

        return self._run("Encrypt", caller, request, body, read_only=True)

    def decrypt(
        self,
        *,
        caller: Caller,
        ciphertext_blob: bytes,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
        encryption_algorithm: str | None = None,
    ) -> JSON:
        """Decrypt a blob made by Encrypt; KeyId is optional for symmetric keys.

        Returns ``{"KeyId", "Plaintext", "EncryptionAlgorithm"}`` only after the
        Decrypt event is committed. Raises InvalidCiphertextError for any blob that
        does not authenticate (malformed, tampered, wrong context or key: one error,
        no detail), IncorrectKeyError when KeyId names another key than the blob's,
        NotFoundError, DisabledError, ValidationError, LedgerUnavailableError.
        """
        request: JSON = {"encryptionAlgorithm": encryption_algorithm or SYMMETRIC_DEFAULT}
        if key_id is not None:
            request["keyId"] = key_id
        if isinstance(encryption_context, Mapping):
            request["encryptionContext"] = dict(encryption_context)

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            context = self._check_context(encryption_context)
            algorithm = self._check_algorithm(encryption_algorithm)
            if not isinstance(ciphertext_blob, bytes | bytearray) or len(ciphertext_blob) < 1:
                raise validation_error(
                    "ciphertextBlob", "Member must have length greater than or equal to 1"
                )
            if len(ciphertext_blob) > MAX_CIPHERTEXT:
                raise validation_error(
                    "ciphertextBlob", "Member must have length less than or equal to 6144"
                )
            named = self._key_for(key_id, attempt) if key_id is not None else None
            env = envelope.parse(bytes(ciphertext_blob))
            if named is not None and UUID(named.key_id) != env.key_id:
                raise IncorrectKeyError(
                    "The key ID in the request does not identify a CMK that can perform "
                    "this operation."
                )
            if named is not None:
                key = named
            else:
                try:
                    key = self.load_key(env.key_id)
                except NotFoundError:
                    raise InvalidCiphertextError("") from None
                attempt.key_arn = key.arn
            self._check_usable(key)
            if algorithm != SYMMETRIC_DEFAULT:
                raise IncorrectKeyError(
                    "The key ID in the request does not identify a CMK that can perform "
                    "this operation."
                )
            try:
                material = key.material_version(env.version)
            except KeyError:
                raise InvalidCiphertextError("") from None
            plaintext = self.keystore.decrypt(
                material, env.iv, env.ciphertext, envelope.aad(env.key_id, env.version, context)
            )
            self._commit_call(
                ApiCall.succeeded(
                    call=call,
                    timestamp=self.clock.now(),
                    key_arn=key.arn,
                    request=request,
                    additional={"keyMaterialId": material.material_id},
                )
            )
            return {"KeyId": key.arn, "Plaintext": plaintext, "EncryptionAlgorithm": algorithm}

        return self._run("Decrypt", caller, request, body, read_only=True)

    def _check_usable(self, key: Key) -> None:
        if not key.enabled:
            raise DisabledError(f"{key.arn} is disabled.")
