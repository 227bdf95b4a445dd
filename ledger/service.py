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

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.persistence import IntegrityError, Mapper

from ledger import authz, envelope, signatures
from ledger.clock import Clock, SystemClock
from ledger.domain import grants
from ledger.domain.key_specs import (
    COMPATIBLE_USAGES,
    HMAC_MAC_ALGORITHM,
    KEY_PAIR_SPECS,
    MAC_ALGORITHMS,
    RSA_ENCRYPTION_ALGORITHMS,
    RSA_MODULUS_BYTES,
    SIGNING_ALGORITHMS,
    SIGNING_ALGORITHMS_BY_SPEC,
    SUPPORTED_USAGES,
    digest_length,
    key_algorithms,
    rsa_max_plaintext,
)
from ledger.domain.model import (
    Alias,
    ApiCall,
    CallContext,
    Key,
    kek_label,
    material_from_json,
    material_to_json,
)
from ledger.domain.principals import (
    AccessKey,
    Principal,
    account_of,
    check_principal_input,
    is_root,
    principal_arn,
)
from ledger.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    DryRunOperationError,
    ExpiredImportTokenError,
    IncorrectKeyError,
    InvalidCiphertextError,
    InvalidGrantTokenError,
    InvalidImportTokenError,
    InvalidKeyUsageError,
    KeyLedgerError,
    KMSInvalidMacError,
    KMSInvalidSignatureError,
    LedgerUnavailableError,
    LimitExceededError,
    MalformedPolicyDocumentError,
    NotAuthorizedError,
    NotFoundError,
    TagError,
    UnrecognizedClientError,
    UnsupportedOperationError,
    ValidationError,
)
from ledger.groupcommit import GroupCommitter
from ledger.keystore.port import KeyStore, MaterialRef
from ledger.pagination import paginate
from ledger.persistence import CanonicalMapper, LedgerDatabase
from ledger.policy import parse_policy
from ledger.settings import Settings

T = TypeVar("T")
JSON = dict[str, Any]


def _paged(key_id: str, limit: int | None, marker: str | None) -> JSON:
    """The request of a paged read of one key (KeyId, Limit, Marker)."""
    return {"keyId": key_id, "limit": limit, "marker": marker}


def _given(request: JSON) -> JSON:
    """The members the caller sent: a request built with None for what was not sent
    is recorded as CloudTrail logs it, without them."""
    return {k: v for k, v in request.items() if v is not None}


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
_ALIAS_ARN_RE = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):(\d{12}):alias/.+$")

# Operations that accept a key of another account by its key ARN (AWS KMS
# "Allowing users in other accounts to use a KMS key").
CROSS_ACCOUNT_OPERATIONS = frozenset(
    {
        "CreateGrant", "Decrypt", "DescribeKey", "DeriveSharedSecret", "Encrypt",
        "GenerateDataKey", "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext",
        "GenerateDataKeyWithoutPlaintext", "GenerateMac", "GetKeyRotationStatus",
        "GetPublicKey", "ListGrants", "ReEncrypt", "RetireGrant", "RevokeGrant", "Sign",
        "Verify", "VerifyMac",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the transport knows it (CLI user, SigV4 principal)."""

    principal: str
    source_ip: str | None = None
    user_agent: str | None = None
    #: The caller's account and the request's region; None means the ledger's defaults.
    account_id: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    #: Set by the HTTP API from the x-amz-source/x-amz-via-service headers: kms:ViaService.
    via_service: str | None = None


def validation_error(field: str, constraint: str, value: object | None = None) -> ValidationError:
    shown = "" if value is None else f" '{value}'"
    return ValidationError(
        f"1 validation error detected: Value{shown} at '{field}' failed to satisfy "
        f"constraint: {constraint}"
    )


def enum_error(field: str, value: str, allowed: tuple[str, ...]) -> ValidationError:
    constraint = "Member must satisfy enum value set: [" + ", ".join(allowed) + "]"
    return validation_error(field, constraint, value)


WRAPPING_ALGORITHMS = (
    "RSAES_OAEP_SHA_1",
    "RSAES_OAEP_SHA_256",
    "RSA_AES_KEY_WRAP_SHA_1",
    "RSA_AES_KEY_WRAP_SHA_256",
)
WRAPPING_KEY_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096")
EXPIRATION_MODELS = ("KEY_MATERIAL_EXPIRES", "KEY_MATERIAL_DOES_NOT_EXPIRE")
INCORRECT_KEY_MESSAGE = (
    "The key ID in the request does not identify a CMK that can perform this operation."
)
DATA_KEY_SPECS = {"AES_128": 16, "AES_256": 32}
ALIAS_NAME_RE = re.compile(r"^[a-zA-Z0-9:/_-]+$")
MAX_POLICY_BYTES = 32768


def check_description(description: str) -> None:
    if len(description) > MAX_DESCRIPTION:
        raise validation_error("description", "Member must have length less than or equal to 8192")


def check_tags(tags: list[dict[str, str]]) -> dict[str, str]:
    """TagResource/CreateKey tags to a map; raises TagError or ValidationError as AWS."""
    out: dict[str, str] = {}
    for i, tag in enumerate(tags, start=1):
        if not isinstance(tag, Mapping) or "TagKey" not in tag or "TagValue" not in tag:
            raise ValidationError("Each tag needs a TagKey and a TagValue.")
        k, v = tag["TagKey"], tag["TagValue"]
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValidationError("TagKey and TagValue must be strings.")
        if not 1 <= len(k) <= 128:
            raise validation_error(
                f"tags.{i}.member.tagKey",
                "Member must have length less than or equal to 128"
                if k
                else "Member must have length greater than or equal to 1",
                k,
            )
        if len(v) > 256:
            raise validation_error(
                f"tags.{i}.member.tagValue", "Member must have length less than or equal to 256", v
            )
        if k.lower().startswith("aws:"):
            raise TagError("Tags beginning with aws: are reserved")
        if k in out:
            raise TagError("Duplicate tag keys")
        out[k] = v
    if len(out) > 50:
        raise TagError("Too many tags")
    return out


def check_policy(policy: str) -> None:
    """A key policy document; raises MalformedPolicyDocumentError or LimitExceededError."""
    if not isinstance(policy, str) or not policy:
        raise validation_error("policy", "Member must have length greater than or equal to 1")
    if len(policy.encode("utf-8")) > MAX_POLICY_BYTES:
        raise LimitExceededError("The key policy exceeds the maximum size of 32768 bytes.")
    try:
        doc = json.loads(policy)
    except ValueError:
        raise MalformedPolicyDocumentError("The policy is not valid JSON.") from None
    statements = doc.get("Statement") if isinstance(doc, dict) else None
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise MalformedPolicyDocumentError("The policy must contain a Statement.")
    for st in statements:
        if not isinstance(st, dict) or st.get("Effect") not in ("Allow", "Deny"):
            raise MalformedPolicyDocumentError("Each policy statement needs Effect Allow or Deny.")
        if "Action" not in st and "NotAction" not in st:
            raise MalformedPolicyDocumentError("Each policy statement needs an Action.")
        if "Principal" not in st and "NotPrincipal" not in st:
            raise MalformedPolicyDocumentError("Each policy statement needs a Principal.")
    parse_policy(policy)


def check_alias_name(alias_name: str) -> None:
    """Raise what AWS raises for a malformed, reserved or overlong alias name."""
    if not isinstance(alias_name, str) or not alias_name:
        raise validation_error("aliasName", "Member must have length greater than or equal to 1")
    if len(alias_name) > 256:
        raise validation_error(
            "aliasName", "Member must have length less than or equal to 256", alias_name
        )
    if not alias_name.startswith("alias/"):
        raise ValidationError(
            'Alias must start with the prefix "alias/". Please see '
            "https://docs.aws.amazon.com/kms/latest/developerguide/kms-alias.html"
        )
    if not ALIAS_NAME_RE.match(alias_name) or ":" in alias_name or alias_name == "alias/":
        raise validation_error(
            "aliasName",
            "Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$",
            alias_name,
        )
    if alias_name.startswith("alias/aws/"):
        raise NotAuthorizedError(
            "Alias names that begin with alias/aws/ are reserved for AWS managed keys."
        )


def check_range(field: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(f"{field} must be an integer.")
    if value < low:
        raise validation_error(
            field, f"Member must have value greater than or equal to {low}", value
        )
    if value > high:
        raise validation_error(field, f"Member must have value less than or equal to {high}", value)


class _Attempt:
    """One call in progress: who, what was asked, and what it learned before it
    failed (the resolved key ARN)."""

    def __init__(
        self,
        call: CallContext | None = None,
        caller: Caller | None = None,
        request: JSON | None = None,
    ) -> None:
        self.key_arn: str | None = None
        self.call = call
        self.caller = caller
        self.request: JSON = request if request is not None else {}
        self.principal: authz.Principal | None = None


_CURRENT: ContextVar[_Attempt | None] = ContextVar("keyledger_current_call", default=None)
_DRY_RUN: ContextVar[bool] = ContextVar("keyledger_dry_run", default=False)
_DEFERRED: ContextVar[list[Any] | None] = ContextVar("keyledger_deferred", default=None)
_REQUEST_ID: ContextVar[list[str] | None] = ContextVar("keyledger_request_id", default=None)
DRY_RUN_MESSAGE = "The request would have succeeded, but the DryRun option is set."


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Operations called inside run every check (validation, authorization, key state,
    the cryptography itself) and then raise DryRunOperationError instead of recording a
    success or changing state; the attempt is recorded with that error code, as AWS
    CloudTrail records dry runs."""
    token = _DRY_RUN.set(True)
    try:
        yield
    finally:
        _DRY_RUN.reset(token)


@contextlib.contextmanager
def deferred_records() -> Iterator[list[Any]]:
    """Operations called inside do not commit their call records (success or failure)
    themselves: the records are appended to the yielded list, and the caller must
    commit them (``KeyLedger.save``) before it lets any result or error of those calls
    out. Changes of key state still commit at once. The HTTP API uses this to run the
    cryptographic operations on its event loop and store the records of many calls in
    one transaction (``api.committer``).

    Security: a result held back this way must be dropped, not returned, if the commit
    fails (fail closed, as ``_commit_call``).
    """
    records: list[Any] = []
    token = _DEFERRED.set(records)
    try:
        yield records
    finally:
        _DEFERRED.reset(token)


@contextlib.contextmanager
def record_request_id(value: str) -> Iterator[None]:
    """The first call begun inside gets ``value`` (a UUID string) as its request id, the
    ``requestID`` of its CloudTrail record; later calls get ids of their own, so no two
    records share one. The HTTP API passes the id it answers in ``x-amzn-RequestId``,
    so a client's request id finds its record, as in AWS."""
    token = _REQUEST_ID.set([value])
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


def _refuse_if_dry_run() -> None:
    if _DRY_RUN.get():
        raise DryRunOperationError(DRY_RUN_MESSAGE)


ACCESS_KEY_PREFIX = "AKLD"
# How stale a cached aggregate may be for another process's changes (see _fresh).
STATE_RECHECK_SECONDS = 0.005


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
        self._policies = authz.PolicyCache()
        # aggregate id -> state version read before it was last brought up to date
        self._synced: dict[UUID, int] = {}
        self._version_read: tuple[float, int] | None = None  # (monotonic start, version)
        self._state_saved_at = 0.0  # when this process last saved a change of state
        self._synced_max = int(full_env["AGGREGATE_CACHE_MAXSIZE"]) * 2

    def construct_mapper(self) -> Mapper[UUID]:
        return CanonicalMapper()

    # ----------------------------------------------------------------- helpers

    def _call(self, operation: str, caller: Caller) -> CallContext:
        account, region = self.scope_of(caller)
        given = _REQUEST_ID.get()
        return CallContext(
            operation=operation,
            request_id=given.pop() if given else str(uuid.uuid4()),
            principal=caller.principal,
            region=region,
            account_id=account,
            source_ip=caller.source_ip,
            user_agent=caller.user_agent,
            access_key_id=caller.access_key_id,
        )

    def _scope(self) -> tuple[str, str]:
        """(account, region) of the call in progress, else the ledger's defaults."""
        current = _CURRENT.get()
        if current is not None and current.call is not None:
            return current.call.account_id, current.call.region
        return self.settings.account_id, self.settings.region

    def _scoped_key_arn(self, key_id: str) -> str:
        account, region = self._scope()
        return f"arn:aws:kms:{region}:{account}:key/{key_id}"

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        """Application.save; after a save that may have changed state, the next call
        reads the state version afresh (see ``_fresh``), so this process sees its own
        changes at once."""
        if objs and not kwargs and all(type(o) is ApiCall for o in objs):
            # Recorded calls (every API call's one write): Application.save without
            # its runtime Protocol isinstance checks, a fifth of a batch's CPU.
            processing = ProcessingEvent[UUID]()
            for obj in objs:
                processing.events.extend(obj.collect_events())
                processing.aggregates[obj.id] = obj
            recordings = self._record(processing)
            self._take_snapshots(processing)
            self._notify(recordings)
            self.notify(processing.events)
            return recordings
        recordings = super().save(*objs, **kwargs)
        self._state_saved_at = time.monotonic()
        return recordings

    def _state_version(self) -> int:
        """The ledger's state version as read at most ``STATE_RECHECK_SECONDS`` ago
        (or since this process last saved a change of state)."""
        read = self._version_read
        now = time.monotonic()
        if (
            read is not None
            and read[0] > self._state_saved_at
            and now - read[0] <= STATE_RECHECK_SECONDS
        ):
            return read[1]
        version = self.db.state_version()
        latest = self._version_read
        if latest is None or latest[0] < now:
            self._version_read = (now, version)
        return version

    def _fresh(self, aggregate_id: UUID) -> object:
        """The shared cached aggregate (read it, never trigger events on it), brought up
        to date only when some transaction that changed state committed, in any process,
        since it last was: at most one read of the state version every
        ``STATE_RECHECK_SECONDS`` instead of a query for each aggregate's new events
        under its lock on every call (a lock convoy at 16 concurrent calls).

        Consistency: this process's own changes count at once; another process's (a
        CLI command, another worker) within ``STATE_RECHECK_SECONDS`` of commit.

        Raises AggregateNotFoundError.
        """
        version = self._state_version()  # read before catching up: never too new
        cache = self.repository.cache
        if cache is not None and self._synced.get(aggregate_id) == version:
            try:
                return cache.get(aggregate_id)
            except KeyError:  # evicted
                pass
        agg: object = self.repository.get(aggregate_id, deepcopy_from_cache=False)
        if len(self._synced) > self._synced_max:
            self._synced.clear()
        self._synced[aggregate_id] = version
        return agg

    def _commit(self, *objs: Any) -> None:
        _refuse_if_dry_run()
        try:
            self.save(*objs)
        except Exception as exc:  # fail closed: no record, no result
            raise LedgerUnavailableError("The ledger could not record the request.") from exc

    def _record_use(
        self, call: CallContext, key_arn: str, request: JSON, material_id: str | None
    ) -> None:
        """Record one successful use of a key (group commit); see ``_commit_call``."""
        self._record_success(call, key_arn, request, {"keyMaterialId": material_id})

    def _record_success(
        self, call: CallContext, key_arn: str | None, request: JSON, additional: JSON | None
    ) -> None:
        """Record a successful call that changes no key state (a use, a read, random
        bytes). Raises LedgerUnavailableError."""
        self._commit_call(
            ApiCall.succeeded(
                call=call,
                timestamp=self.clock.now(),
                key_arn=key_arn,
                request=request,
                additional=additional,
            )
        )

    def _commit_call(self, call_record: ApiCall) -> None:
        """Store an ApiCall record through group commit (its id never conflicts)."""
        if any(isinstance(e, ApiCall.Succeeded) for e in call_record.pending_events):
            _refuse_if_dry_run()
        deferred = _DEFERRED.get()
        if deferred is not None:
            deferred.append(call_record)
            return
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
        attempt = _Attempt(call, caller, request)
        token = _CURRENT.set(attempt)
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
        finally:
            _CURRENT.reset(token)

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
                read_only=operation in ("Encrypt", "Decrypt")
                or operation.startswith(("List", "Describe", "Get")),
            )
        )

    def resolve_key_id(self, key_id: str, *, allow_alias: bool = False) -> UUID:
        """A key id, key ARN or (where ``allow_alias``) alias name or alias ARN to the
        key's UUID. Existence of the key is not checked; an alias must exist.

        Raises NotFoundError for unknown aliases, malformed ids and ARNs of another
        account or region, and ValidationError for an empty or overlong id.
        """
        if not key_id:
            raise validation_error("keyId", "Member must have length greater than or equal to 1")
        if len(key_id) > 2048:
            raise validation_error("keyId", "Member must have length less than or equal to 2048")
        if key_id.startswith("alias/") or (key_id.startswith("arn:") and ":alias/" in key_id):
            if not allow_alias:
                raise NotFoundError(f"Invalid keyId '{key_id}'")
            alias = self.load_alias(self.alias_arn_of(key_id))
            assert alias.target_key_id is not None
            return UUID(alias.target_key_id)
        m = _ARN_RE.match(key_id)
        if m:
            region, account, rest = m.groups()
            my_account, my_region = self._scope()
            if region != my_region:
                raise NotFoundError(f"Invalid arn {region}")
            current = _CURRENT.get()
            operation = current.call.operation if current and current.call else None
            if account != my_account and operation not in CROSS_ACCOUNT_OPERATIONS:
                raise NotFoundError(f"Invalid arn {key_id}")
            if not _UUID_RE.match(rest):
                raise NotFoundError(f"Invalid keyId '{rest}'")
            return UUID(rest)
        if key_id.startswith("arn:"):
            raise NotFoundError(f"Invalid arn {key_id}")
        if not _UUID_RE.match(key_id):
            raise NotFoundError(f"Invalid keyId '{key_id}'")
        return UUID(key_id)

    def alias_arn_of(self, alias: str) -> str:
        """``alias/name`` or an alias ARN to the alias ARN in this account and region.

        Raises NotFoundError for an alias ARN of another account or region.
        """
        account, region = self._scope()
        if alias.startswith("arn:"):
            m = _ALIAS_ARN_RE.match(alias)
            if not m or m.group(1) != region or m.group(2) != account:
                raise NotFoundError(f"Invalid arn {alias}")
            return alias
        return f"arn:aws:kms:{region}:{account}:{alias}"

    def load_alias(self, alias_arn: str, *, for_update: bool = False) -> Alias:
        """The alias (existing now); raises NotFoundError otherwise.

        Without ``for_update`` the shared cached object is returned: read it, never
        trigger events on it.
        """
        agg: object
        try:
            agg = (
                self.repository.get(Alias.stream_id(alias_arn))
                if for_update
                else self._fresh(Alias.stream_id(alias_arn))
            )
        except AggregateNotFoundError:
            agg = None
        if not isinstance(agg, Alias) or not agg.exists or self._key_deleted(agg.target_key_id):
            raise NotFoundError(f"Alias {alias_arn} is not found.")
        return agg

    def _key_deleted(self, key_id: str | None) -> bool:
        """True when the key was deleted: its aliases went with it (as in AWS)."""
        if key_id is None:
            return False
        agg: object
        try:
            agg = self._fresh(UUID(key_id))
        except AggregateNotFoundError:
            return False
        return isinstance(agg, Key) and agg.deleted

    def load_key(self, key_uuid: UUID, *, for_update: bool = False) -> Key:
        """The current state of a key; raises NotFoundError when it does not exist
        (never created, or deleted at the end of its waiting period).

        Without ``for_update`` the shared cached object is returned (no copy on the hot
        path): read it, never trigger events on it.
        """
        agg: object
        try:
            agg = self.repository.get(key_uuid) if for_update else self._fresh(key_uuid)
        except AggregateNotFoundError:
            agg = None
        if not isinstance(agg, Key) or agg.deleted:
            raise NotFoundError(f"Key '{self._scoped_key_arn(str(key_uuid))}' does not exist")
        return agg

    def _key_for(
        self,
        key_id: str,
        attempt: _Attempt,
        *,
        allow_alias: bool = False,
        for_update: bool = False,
        side: str | None = None,
        authorize: bool = True,
    ) -> Key:
        """Resolve ``key_id`` in the caller's account and region (another account's key
        only by its ARN, for operations AWS allows across accounts), load the key and
        authorize the call on it.

        Raises NotFoundError, AccessDeniedError.
        """
        key_uuid = self.resolve_key_id(key_id, allow_alias=allow_alias)
        key = self.load_key(key_uuid, for_update=for_update)
        m = _ARN_RE.match(key_id)
        if m:
            expected = f"arn:aws:kms:{m.group(1)}:{m.group(2)}:key/{key.key_id}"
        elif key_id.startswith("alias/") or ":alias/" in key_id:
            expected = key.arn  # aliases resolve only within the caller's account
        else:
            expected = self._scoped_key_arn(key.key_id)
        if key.arn != expected:
            raise NotFoundError(f"Key '{expected}' does not exist")
        attempt.key_arn = key.arn
        if authorize:
            self._authorize_key(attempt, key, side=side)
        return key

    # ----------------------------------------------------------- authorization

    def _principal(self, attempt: _Attempt) -> authz.Principal:
        """The caller's principal with its identity policies (cached on the attempt).

        Raises UnrecognizedClientError for a disabled or deleted registered principal.
        """
        if attempt.principal is not None:
            return attempt.principal
        assert attempt.call is not None
        arn = attempt.call.principal
        policies: list[Any] = []
        if not is_root(arn):
            agg: object
            try:
                agg = self._fresh(Principal.stream_id(arn))
            except AggregateNotFoundError:
                agg = None
            if isinstance(agg, Principal):
                if not agg.enabled:  # as AWS answers a deactivated access key
                    raise UnrecognizedClientError(
                        "The security token included in the request is invalid."
                    )
                policies = [
                    self._policies.get(text, identity=True) for text in agg.policies.values()
                ]
        attempt.principal = authz.Principal(
            arn=arn,
            account=account_of(arn) or attempt.call.account_id,
            identity_policies=tuple(policies),
        )
        return attempt.principal

    @staticmethod
    def _request_context(attempt: _Attempt, side: str | None) -> Mapping[str, str] | None:
        """The encryption context the request names for this side of the call (ReEncrypt
        has one per key: a missing one counts as empty), or None."""
        if attempt.call is not None and attempt.call.operation == "ReEncrypt":
            member = (
                "sourceEncryptionContext" if side == "source" else ("destinationEncryptionContext")
            )
            ec = attempt.request.get(member)
            return ec if isinstance(ec, Mapping) else {}
        ec = attempt.request.get("encryptionContext")
        return ec if isinstance(ec, Mapping) else None

    def _conditions(
        self,
        attempt: _Attempt,
        key: Key | None,
        encryption_context: Mapping[str, str] | None,
    ) -> dict[str, object]:
        assert attempt.call is not None and attempt.caller is not None
        return authz.condition_context(
            principal=self._principal(attempt),
            source_ip=attempt.caller.source_ip,
            via_service=attempt.caller.via_service,
            request=attempt.request,
            encryption_context=encryption_context,
            key=key,
            now=self.clock.now(),
        )

    def _authorize_key(
        self,
        attempt: _Attempt,
        key: Key,
        *,
        side: str | None = None,
    ) -> None:
        """Raise AccessDeniedError unless policy or grant allows this call on ``key``."""
        if attempt.call is None or attempt.call.service_initiated:
            return
        op = attempt.call.operation
        encryption_context = self._request_context(attempt, side)
        principal = self._principal(attempt)
        # Both built only if a policy with conditions or the grants have to be read.
        context = authz.LazyContext(lambda: self._conditions(attempt, key, encryption_context))
        authz.authorize_key(
            principal=principal,
            action=authz.action_for(op, side=side),
            operation=op,
            key_arn=key.arn,
            key_policy=self._policies.get(key.policy),
            key_grants=(grants.GrantSpec.from_json(g["grant"]) for g in key.grants.values()),
            context=context,
            encryption_context=encryption_context,
            grant_request=attempt.request if op == "CreateGrant" else None,
        )

    def _authorize_identity(self, attempt: _Attempt, action: str, resource: str = "*") -> None:
        """An action no key policy governs (CreateKey, ListKeys, ...); raises
        AccessDeniedError."""
        if attempt.call is None or attempt.call.service_initiated:
            return
        authz.authorize_identity(
            self._principal(attempt),
            action,
            self._conditions(attempt, None, self._request_context(attempt, None)),
            resource,
        )

    def _lockout_check(self, policy: str, key_arn: str) -> None:
        """The policy lockout safety check; raises MalformedPolicyDocumentError."""
        current = _CURRENT.get()
        if current is None or current.call is None:
            return
        if not authz.lockout_safe(self._policies.get(policy), self._principal(current), key_arn):
            raise MalformedPolicyDocumentError(
                "The new key policy will not allow you to update the key policy in the future."
            )

    def run_read(
        self,
        *,
        caller: Caller,
        operation: str,
        request: JSON,
        answer: Callable[[], T],
        listing: bool = True,
        key_id: str | None = None,
    ) -> T:
        """A read that the read side answers (the key catalog, a point-in-time replay),
        as one recorded call: authorized on the identity side when ``listing`` (an
        account-wide read such as ListKeys) and on ``key_id``'s key when given, then
        answered by ``answer``. A success is recorded as a read-only call, as CloudTrail
        does; a refusal or a failure of ``answer`` with its error code.

        ``request`` is what the caller sent (members that are None are left out).
        Raises AccessDeniedError, NotFoundError, whatever KeyLedgerError ``answer``
        raises, and LedgerUnavailableError when the record cannot be stored (then
        nothing is answered).
        """

        def read(attempt: _Attempt) -> T:
            if listing:
                self._authorize_identity(attempt, "kms:" + operation)
            if key_id is not None:
                self._key_for(key_id, attempt, allow_alias=True)
            return answer()

        return self._recorded_read(operation, caller, request, read)

    def _recorded_read(
        self, operation: str, caller: Caller, request: JSON, read: Callable[[_Attempt], T]
    ) -> T:
        """Run ``read`` as one read-only call: a success is recorded as CloudTrail logs
        reads (null responseElements; the request without unsent members), a failure
        with its error code. Raises what ``read`` raises, and LedgerUnavailableError
        (and no answer) when the record cannot be stored."""
        sent = _given(request)

        def body(call: CallContext, attempt: _Attempt) -> T:
            out = read(attempt)
            self._record_success(call, attempt.key_arn, sent, None)
            return out

        return self._run(operation, caller, sent, body, read_only=True)

    def scope_of(self, caller: Caller) -> tuple[str, str]:
        """The (account, region) a caller's requests act in."""
        account = caller.account_id or account_of(caller.principal) or self.settings.account_id
        return account, caller.region or self.settings.region

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
        md: JSON = {
            "AWSAccountId": key.arn.split(":")[4],
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
            **key_algorithms(key.key_spec, key.key_usage),
            "MultiRegion": False,
        }
        if key.deletion_date is not None:
            md["DeletionDate"] = datetime.fromisoformat(key.deletion_date).timestamp()
            md["PendingDeletionWindowInDays"] = key.pending_window_days
        if key.current_material_id is not None:
            md["CurrentKeyMaterialId"] = key.current_material_id
        if key.expiration_model:
            md["ExpirationModel"] = key.expiration_model
            if key.valid_to:
                md["ValidTo"] = datetime.fromisoformat(key.valid_to).timestamp()
        return md

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
        policy: str | None = None,
        tags: list[dict[str, str]] | None = None,
        bypass_policy_lockout_safety_check: bool = False,
    ) -> JSON:
        """CreateKey: SYMMETRIC_DEFAULT / ENCRYPT_DECRYPT keys, origin AWS_KMS (material
        generated in the HSM) or EXTERNAL (created PendingImport, without material).

        Raises ValidationError for values outside AWS's enums or limits, TagError,
        MalformedPolicyDocumentError, and UnsupportedOperationError for valid values
        this version cannot yet create.
        """
        usage_default = (
            "ENCRYPT_DECRYPT" if (key_spec or SYMMETRIC_DEFAULT) == SYMMETRIC_DEFAULT else None
        )
        request: JSON = {
            "description": description,
            "keySpec": key_spec or SYMMETRIC_DEFAULT,
            "keyUsage": key_usage or usage_default,
            "origin": origin or "AWS_KMS",
            "bypassPolicyLockoutSafetyCheck": bypass_policy_lockout_safety_check,
        }
        if tags:
            request["tags"] = tags
        if policy is not None:  # AWS logs a given policy (detections read it)
            request["policy"] = policy

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            self._authorize_identity(attempt, "kms:CreateKey")
            check_description(description)
            spec, usage, orig = request["keySpec"], request["keyUsage"], request["origin"]
            if spec not in KEY_SPECS:
                raise enum_error("keySpec", spec, KEY_SPECS)
            if usage is None:
                raise ValidationError(
                    "You must specify a KeyUsage value for all KMS keys except for symmetric "
                    "encryption keys."
                )
            if usage not in KEY_USAGES:
                raise enum_error("keyUsage", usage, KEY_USAGES)
            if orig not in ORIGINS:
                raise enum_error("origin", orig, ORIGINS)
            compatible = COMPATIBLE_USAGES.get(spec)
            if compatible is not None and usage not in compatible:
                raise ValidationError(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
            tag_map = check_tags(tags or [])
            if policy is not None:
                check_policy(policy)
            if usage not in SUPPORTED_USAGES.get(spec, ()) or (
                orig not in ("AWS_KMS", "EXTERNAL")
                or (
                    orig == "EXTERNAL"
                    and spec != SYMMETRIC_DEFAULT
                    and spec not in HMAC_MAC_ALGORITHM
                )
            ):
                raise UnsupportedOperationError(
                    f"KeySpec {spec} with KeyUsage {usage} and origin {orig} is not supported "
                    "by this KeyLedger version."
                )
            key_uuid = uuid.uuid4()
            arn = f"arn:aws:kms:{call.region}:{call.account_id}:key/{key_uuid}"
            if policy is not None and not bypass_policy_lockout_safety_check:
                self._lockout_check(policy, arn)
            material: MaterialRef | None = None
            public_key: bytes | None = None
            if orig == "AWS_KMS" and spec in SIGNING_ALGORITHMS_BY_SPEC:
                material, public_key = self.keystore.generate_key_pair(
                    spec, kek=kek_label(key_uuid), key_usage=usage
                )
            elif orig == "AWS_KMS" and spec in HMAC_MAC_ALGORITHM:
                material = self.keystore.generate_hmac_key(spec, kek=kek_label(key_uuid))
            elif orig == "AWS_KMS":
                material = self.keystore.generate_symmetric_key(kek=kek_label(key_uuid))
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
                policy=policy,
                tags=tag_map,
                public_key=public_key,
            )
            self._commit(key)
            return {"KeyMetadata": self.metadata(key)}

        return self._run("CreateKey", caller, request, body, read_only=False)

    def _key_command(
        self,
        operation: str,
        caller: Caller,
        key_id: str,
        request: JSON,
        change: Callable[[Key, CallContext, datetime], JSON],
        *,
        prepare: Callable[[], None] | None = None,
    ) -> JSON:
        """Load the key, apply ``change`` (which triggers one event and returns the
        response), save; on a concurrent write reload and retry. ``prepare`` runs
        parameter validation first so bad input fails before the key is loaded."""

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            if prepare is not None:
                prepare()

            def step() -> tuple[Any, JSON]:
                key = self._key_for(key_id, attempt, for_update=True)
                return key, change(key, call, self.clock.now())

            return self._save_retrying(step)

        return self._run(operation, caller, request, body, read_only=False)

    def _save_retrying(self, step: Callable[[], tuple[Any, JSON]]) -> JSON:
        """Run ``step`` (load an aggregate, trigger one event, return it and the
        response) and save; when another writer moved the aggregate on, load and retry.

        Raises LedgerUnavailableError when the ledger cannot commit.
        """
        for _ in range(5):
            aggregate, response = step()
            _refuse_if_dry_run()
            try:
                self.save(aggregate)
            except IntegrityError:
                continue
            except Exception as exc:
                raise LedgerUnavailableError("The ledger could not record the request.") from exc
            return response
        raise LedgerUnavailableError(
            "Concurrent changes kept winning; the request was not recorded."
        )

    def enable_key(self, *, caller: Caller, key_id: str) -> JSON:
        """EnableKey. Raises NotFoundError, KMSInvalidStateError."""
        request: JSON = {"keyId": key_id}

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.enable(call=call, timestamp=now, request=request)
            return {}

        return self._key_command("EnableKey", caller, key_id, request, change)

    def disable_key(self, *, caller: Caller, key_id: str) -> JSON:
        """DisableKey. Raises NotFoundError, KMSInvalidStateError."""
        request: JSON = {"keyId": key_id}

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.disable(call=call, timestamp=now, request=request)
            return {}

        return self._key_command("DisableKey", caller, key_id, request, change)

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
            key = self._key_for(key_id, attempt, allow_alias=True)
            key.check("Encrypt")
            if key.key_spec in RSA_MODULUS_BYTES:
                blob, material_id = self._rsa_encrypt(key, bytes(plaintext), algorithm, context)
            elif algorithm != SYMMETRIC_DEFAULT:
                raise IncorrectKeyError(INCORRECT_KEY_MESSAGE)
            else:
                blob, material_id = self._seal(key, bytes(plaintext), context)
            self._record_use(call, key.arn, request, material_id)
            return {"CiphertextBlob": blob, "KeyId": key.arn, "EncryptionAlgorithm": algorithm}

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

        Returns ``{"KeyId", "Plaintext", "EncryptionAlgorithm"}`` (and ``KeyMaterialId``
        for symmetric keys, as AWS) only after the Decrypt event is committed. Raises
        InvalidCiphertextError for any blob that does not authenticate (malformed,
        tampered, wrong context or key: one error, no detail), IncorrectKeyError when
        KeyId names another key than the blob's, NotFoundError, DisabledError,
        ValidationError, LedgerUnavailableError.
        """
        request: JSON = {"encryptionAlgorithm": encryption_algorithm or SYMMETRIC_DEFAULT}
        if key_id is not None:
            request["keyId"] = key_id
        if isinstance(encryption_context, Mapping):
            request["encryptionContext"] = dict(encryption_context)

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            key, material, plaintext, algorithm = self._open_blob(
                "Decrypt", ciphertext_blob, key_id, encryption_context, encryption_algorithm,
                attempt,
            )  # fmt: skip
            self._record_use(call, key.arn, request, material.material_id)
            out: JSON = {"KeyId": key.arn, "Plaintext": plaintext, "EncryptionAlgorithm": algorithm}
            if key.key_spec == SYMMETRIC_DEFAULT:  # AWS: symmetric keys only
                out["KeyMaterialId"] = material.material_id
            return out

        return self._run("Decrypt", caller, request, body, read_only=True)

    # ------------------------------------------------------------ read helpers

    def _read(
        self,
        operation: str,
        caller: Caller,
        request: JSON,
        key_id: str,
        answer: Callable[[Key], JSON],
        *,
        allow_alias: bool = False,
    ) -> JSON:
        """A read-only operation on one key: the state table applies; recorded as
        ``_recorded_read`` says."""

        def read(attempt: _Attempt) -> JSON:
            key = self._key_for(key_id, attempt, allow_alias=allow_alias)
            key.check(operation)
            return answer(key)

        return self._recorded_read(operation, caller, request, read)

    def describe_key(self, *, caller: Caller, key_id: str) -> JSON:
        """DescribeKey from the write model (accepts aliases). Raises NotFoundError."""
        return self._read(
            "DescribeKey",
            caller,
            {"keyId": key_id},
            key_id,
            lambda key: {"KeyMetadata": self.metadata(key)},
            allow_alias=True,
        )

    # ------------------------------------------------------------ metadata, tags

    def update_key_description(self, *, caller: Caller, key_id: str, description: str) -> JSON:
        """UpdateKeyDescription. Raises ValidationError, NotFoundError, KMSInvalidStateError."""
        request: JSON = {"keyId": key_id, "description": description}

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.update_description(
                call=call, timestamp=now, request=request, description=description
            )
            return {}

        return self._key_command(
            "UpdateKeyDescription", caller, key_id, request, change,
            prepare=lambda: check_description(description),
        )  # fmt: skip

    def tag_resource(self, *, caller: Caller, key_id: str, tags: list[dict[str, str]]) -> JSON:
        """TagResource (adds or overwrites). Raises TagError, ValidationError, NotFoundError,
        KMSInvalidStateError."""
        request: JSON = {"keyId": key_id, "tags": tags}
        parsed: dict[str, str] = {}

        def prepare() -> None:
            if not tags:
                raise validation_error("tags", "Member must have length greater than or equal to 1")
            parsed.update(check_tags(tags))

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.tag(call=call, timestamp=now, request=request, tags=parsed)
            return {}

        return self._key_command("TagResource", caller, key_id, request, change, prepare=prepare)

    def untag_resource(self, *, caller: Caller, key_id: str, tag_keys: list[str]) -> JSON:
        """UntagResource (unknown keys are ignored, as AWS does)."""
        request: JSON = {"keyId": key_id, "tagKeys": tag_keys}

        def prepare() -> None:
            if not tag_keys:
                raise validation_error(
                    "tagKeys", "Member must have length greater than or equal to 1"
                )
            for i, k in enumerate(tag_keys, start=1):
                if not isinstance(k, str) or not 1 <= len(k) <= 128:
                    raise validation_error(
                        f"tagKeys.{i}.member", "Member must have length less than or equal to 128"
                    )

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.untag(call=call, timestamp=now, request=request, tag_keys=list(tag_keys))
            return {}

        return self._key_command("UntagResource", caller, key_id, request, change, prepare=prepare)

    def list_resource_tags(
        self, *, caller: Caller, key_id: str, limit: int | None = None, marker: str | None = None
    ) -> JSON:
        """ListResourceTags, sorted by tag key; Limit 1-50."""

        def answer(key: Key) -> JSON:
            tags = [{"TagKey": k, "TagValue": v} for k, v in sorted(key.tags.items())]
            page, fields = paginate(tags, limit=limit, marker=marker, default=50, maximum=50)
            return {"Tags": page, **fields}

        return self._read("ListResourceTags", caller, _paged(key_id, limit, marker), key_id, answer)

    # ------------------------------------------------------------ key policies

    @staticmethod
    def _check_policy_name(policy_name: str) -> None:
        if policy_name != "default":
            raise ValidationError("PolicyName must be default.")

    def put_key_policy(
        self,
        *,
        caller: Caller,
        key_id: str,
        policy: str,
        policy_name: str = "default",
        bypass_policy_lockout_safety_check: bool = False,
    ) -> JSON:
        """PutKeyPolicy: stored, versioned in the log, replayable (evaluation comes with
        authorization). Raises MalformedPolicyDocumentError, LimitExceededError,
        ValidationError, NotFoundError, KMSInvalidStateError."""
        request: JSON = {
            "keyId": key_id,
            "policyName": policy_name,
            "policy": policy,
            "bypassPolicyLockoutSafetyCheck": bypass_policy_lockout_safety_check,
        }

        def prepare() -> None:
            self._check_policy_name(policy_name)
            check_policy(policy)

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.check("PutKeyPolicy")
            if not bypass_policy_lockout_safety_check:
                self._lockout_check(policy, key.arn)
            key.put_policy(
                call=call, timestamp=now, request=request, policy_name=policy_name, policy=policy
            )
            return {}

        return self._key_command("PutKeyPolicy", caller, key_id, request, change, prepare=prepare)

    def get_key_policy(self, *, caller: Caller, key_id: str, policy_name: str = "default") -> JSON:
        """GetKeyPolicy."""

        def answer(key: Key) -> JSON:
            self._check_policy_name(policy_name)
            return {"Policy": key.policy, "PolicyName": policy_name}

        request = {"keyId": key_id, "policyName": policy_name}
        return self._read("GetKeyPolicy", caller, request, key_id, answer)

    def list_key_policies(
        self, *, caller: Caller, key_id: str, limit: int | None = None, marker: str | None = None
    ) -> JSON:
        """ListKeyPolicies: always ``["default"]``."""

        def answer(key: Key) -> JSON:
            page, fields = paginate(["default"], limit=limit, marker=marker)
            return {"PolicyNames": page, **fields}

        return self._read("ListKeyPolicies", caller, _paged(key_id, limit, marker), key_id, answer)

    # ------------------------------------------------------------ rotation

    def enable_key_rotation(
        self, *, caller: Caller, key_id: str, rotation_period_in_days: int | None = None
    ) -> JSON:
        """EnableKeyRotation (period 90-2560 days, default 365)."""
        period = 365 if rotation_period_in_days is None else rotation_period_in_days
        request: JSON = {"keyId": key_id, "rotationPeriodInDays": period}

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.enable_rotation(call=call, timestamp=now, request=request, period_days=period)
            return {}

        return self._key_command(
            "EnableKeyRotation", caller, key_id, request, change,
            prepare=lambda: check_range("rotationPeriodInDays", period, 90, 2560),
        )  # fmt: skip

    def disable_key_rotation(self, *, caller: Caller, key_id: str) -> JSON:
        """DisableKeyRotation."""
        request: JSON = {"keyId": key_id}

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.disable_rotation(call=call, timestamp=now, request=request)
            return {}

        return self._key_command("DisableKeyRotation", caller, key_id, request, change)

    def key_last_usage(
        self, *, caller: Caller, key_id: str, last_used: Callable[[str], JSON | None]
    ) -> JSON:
        """GetKeyLastUsage: the key's last successful cryptographic call, as
        ``last_used(key_arn)`` finds it (the usage index: operation, timestamp, event id,
        request id), or an empty KeyLastUsage. A key id or key ARN of the caller's
        account only (no alias, no other account). Tracking starts at the key's creation:
        every call since is in the ledger.

        Raises NotFoundError, AccessDeniedError.
        """

        def answer(key: Key) -> JSON:
            return {
                "KeyId": key.key_id,  # the model: "the globally unique identifier" (as the CLI)
                "KeyLastUsage": last_used(key.arn) or {},
                "TrackingStartDate": key.created_on,
                "KeyCreationDate": key.created_on,
            }

        return self._read("GetKeyLastUsage", caller, {"keyId": key_id}, key_id, answer)

    def get_key_rotation_status(self, *, caller: Caller, key_id: str) -> JSON:
        """GetKeyRotationStatus."""

        def answer(key: Key) -> JSON:
            out: JSON = {
                "KeyRotationEnabled": key.rotation_period_days is not None,
                "KeyId": key.arn,
            }
            if key.rotation_period_days is not None and key.next_rotation_date is not None:
                out["RotationPeriodInDays"] = key.rotation_period_days
                out["NextRotationDate"] = datetime.fromisoformat(key.next_rotation_date).timestamp()
            return out

        return self._read("GetKeyRotationStatus", caller, {"keyId": key_id}, key_id, answer)

    def rotate_key_on_demand(self, *, caller: Caller, key_id: str) -> JSON:
        """RotateKeyOnDemand: a new backing-key version generated in the HSM now.

        Raises LimitExceededError past the per-key limit (settings, default 25).
        """
        request: JSON = {"keyId": key_id}
        fresh: list[MaterialRef] = []

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            limit = self.settings.on_demand_rotation_limit
            key.check_on_demand_rotation(limit)  # before any HSM work
            if not fresh:
                fresh.append(self.keystore.generate_symmetric_key(kek=kek_label(key.key_id)))
            key.rotate(
                call=call,
                timestamp=now,
                request=request,
                material=fresh[0],
                rotation_type="ON_DEMAND",
                on_demand_limit=limit,
            )
            return {"KeyId": key.arn}

        return self._key_command("RotateKeyOnDemand", caller, key_id, request, change)

    def list_key_rotations(
        self, *, caller: Caller, key_id: str, limit: int | None = None, marker: str | None = None
    ) -> JSON:
        """ListKeyRotations: every rotation after the initial material, oldest first."""

        def answer(key: Key) -> JSON:
            rows = [
                {
                    "KeyId": key.arn,
                    "KeyMaterialId": m["material_id"],
                    "RotationDate": datetime.fromisoformat(m["rotation_date"]).timestamp(),
                    "RotationType": m["rotation_type"],
                }
                for m in key.rotations()
            ]
            page, fields = paginate(rows, limit=limit, marker=marker)
            return {"Rotations": page, **fields}

        return self._read("ListKeyRotations", caller, _paged(key_id, limit, marker), key_id, answer)

    # ------------------------------------------------------------ deletion

    def schedule_key_deletion(
        self, *, caller: Caller, key_id: str, pending_window_in_days: int | None = None
    ) -> JSON:
        """ScheduleKeyDeletion (7-30 days, default 30): the key turns PendingDeletion and
        refuses cryptographic use; ``maintenance`` deletes it at DeletionDate."""
        days = 30 if pending_window_in_days is None else pending_window_in_days
        request: JSON = {"keyId": key_id, "pendingWindowInDays": days}

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.schedule_deletion(call=call, timestamp=now, request=request, window_days=days)
            assert key.deletion_date is not None
            return {
                "KeyId": key.arn,
                "DeletionDate": datetime.fromisoformat(key.deletion_date).timestamp(),
                "KeyState": key.key_state,
                "PendingWindowInDays": days,
            }

        return self._key_command(
            "ScheduleKeyDeletion", caller, key_id, request, change,
            prepare=lambda: check_range("pendingWindowInDays", days, 7, 30),
        )  # fmt: skip

    def cancel_key_deletion(self, *, caller: Caller, key_id: str) -> JSON:
        """CancelKeyDeletion: the key returns to Disabled."""
        request: JSON = {"keyId": key_id}

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.cancel_deletion(call=call, timestamp=now, request=request)
            return {"KeyId": key.arn}

        return self._key_command("CancelKeyDeletion", caller, key_id, request, change)

    # ------------------------------------------------------------ maintenance

    def _service_call(self, operation: str) -> CallContext:
        return CallContext(
            operation=operation,
            request_id=str(uuid.uuid4()),
            principal="kms.amazonaws.com",
            region=self.settings.region,
            account_id=self.settings.account_id,
            service_initiated=True,
        )

    def perform_due(self, key_uuid: UUID) -> list[str]:
        """Do what is due for one key at the clock's now: automatic rotation (service
        event RotateKey) and deletion at the end of the waiting period (DeleteKey).

        Returns the event names recorded. Raises LedgerUnavailableError.
        """
        done: list[str] = []
        for _ in range(5):
            try:
                key = self.load_key(key_uuid, for_update=True)
            except NotFoundError:
                return done
            now = self.clock.now()
            if key.deletion_due(now):
                # Destroy first: a crash before the record leaves a key that can no
                # longer be used and is deleted again (recorded) by the next run.
                for kek in key.keks():
                    self.keystore.destroy_kek(kek)
                for m in key.materials:
                    self.keystore.forget(str(m["material_id"]))
                key.delete(call=self._service_call("DeleteKey"), timestamp=now)
                name = "DeleteKey"
            elif key.material_expiry_due(now):
                for m in key.materials:
                    self.keystore.forget(str(m["material_id"]))
                key.delete_imported_material(
                    call=self._service_call("DeleteExpiredKeyMaterial"),
                    timestamp=now,
                    request={"keyId": key.key_id},
                )
                name = "DeleteExpiredKeyMaterial"
            elif key.rotation_due(now):
                material = self.keystore.generate_symmetric_key(kek=kek_label(key.key_id))
                key.rotate(
                    call=self._service_call("RotateKey"),
                    timestamp=now,
                    request={"keyId": key.key_id},
                    material=material,
                    rotation_type="AUTOMATIC",
                    on_demand_limit=self.settings.on_demand_rotation_limit,
                )
                name = "RotateKey"
            else:
                return done
            try:
                self.save(key)
            except IntegrityError:
                continue
            except Exception as exc:
                raise LedgerUnavailableError("The ledger could not record the request.") from exc
            done.append(name)
        return done

    # ------------------------------------------------------------ aliases

    def _alias_command(
        self,
        operation: str,
        caller: Caller,
        request: JSON,
        change: Callable[[CallContext, _Attempt, datetime], Alias],
    ) -> JSON:
        def body(call: CallContext, attempt: _Attempt) -> JSON:
            return self._save_retrying(lambda: (change(call, attempt, self.clock.now()), {}))

        return self._run(operation, caller, request, body, read_only=False)

    def _alias_target(self, target_key_id: str, operation: str, attempt: _Attempt) -> Key:
        if target_key_id.startswith("alias/") or ":alias/" in target_key_id:
            raise ValidationError("Aliases must refer to keys. Not aliases")
        key = self._key_for(target_key_id, attempt)
        key.check(operation)
        return key

    def create_alias(self, *, caller: Caller, alias_name: str, target_key_id: str) -> JSON:
        """CreateAlias. Raises ValidationError (malformed name, alias target),
        NotAuthorizedError (``alias/aws/``), AlreadyExistsError, NotFoundError,
        KMSInvalidStateError."""
        request: JSON = {"aliasName": alias_name, "targetKeyId": target_key_id}

        def change(call: CallContext, attempt: _Attempt, now: datetime) -> Alias:
            check_alias_name(alias_name)
            key = self._alias_target(target_key_id, "CreateAlias", attempt)
            arn = self.alias_arn_of(alias_name)
            existing: object
            try:
                existing = self.repository.get(Alias.stream_id(arn))
            except AggregateNotFoundError:
                existing = None
            if isinstance(existing, Alias):
                existing.recreate(
                    call=call, timestamp=now, target_key_id=key.key_id, key_arn=key.arn,
                    request=request, target_deleted=self._key_deleted(existing.target_key_id),
                )  # fmt: skip
                return existing
            return Alias.create(
                call=call, timestamp=now, alias_name=alias_name, alias_arn=arn,
                target_key_id=key.key_id, key_arn=key.arn, request=request,
            )  # fmt: skip

        return self._alias_command("CreateAlias", caller, request, change)

    def update_alias(self, *, caller: Caller, alias_name: str, target_key_id: str) -> JSON:
        """UpdateAlias: point an existing alias at another key of the same type and usage."""
        request: JSON = {"aliasName": alias_name, "targetKeyId": target_key_id}

        def change(call: CallContext, attempt: _Attempt, now: datetime) -> Alias:
            check_alias_name(alias_name)
            alias = self.load_alias(self.alias_arn_of(alias_name), for_update=True)
            key = self._alias_target(target_key_id, "UpdateAlias", attempt)
            assert alias.target_key_id is not None
            current = self.load_key(UUID(alias.target_key_id))
            self._authorize_key(attempt, current)
            if (current.key_spec, current.key_usage) != (key.key_spec, key.key_usage):
                raise ValidationError(
                    f"{key.arn} key usage or key spec does not match the alias's current key."
                )
            alias.retarget(
                call=call, timestamp=now, target_key_id=key.key_id, key_arn=key.arn,
                request=request,
            )  # fmt: skip
            return alias

        return self._alias_command("UpdateAlias", caller, request, change)

    def delete_alias(self, *, caller: Caller, alias_name: str) -> JSON:
        """DeleteAlias. Raises NotFoundError for an unknown alias."""
        request: JSON = {"aliasName": alias_name}

        def change(call: CallContext, attempt: _Attempt, now: datetime) -> Alias:
            if not alias_name.startswith(("alias/", "arn:")):
                check_alias_name(alias_name)
            alias = self.load_alias(self.alias_arn_of(alias_name), for_update=True)
            assert alias.target_key_id is not None
            key_arn = self._scoped_key_arn(alias.target_key_id)
            attempt.key_arn = key_arn
            with contextlib.suppress(NotFoundError):  # a deleted key's alias can still go
                target = self.load_key(UUID(alias.target_key_id))
                self._authorize_key(attempt, target)
                target.check("DeleteAlias")
            alias.delete(call=call, timestamp=now, key_arn=key_arn, request=request)
            return alias

        return self._alias_command("DeleteAlias", caller, request, change)

    # ------------------------------------------------------------ grants

    def create_grant(
        self,
        *,
        caller: Caller,
        key_id: str,
        grantee_principal: str,
        operations: list[str],
        retiring_principal: str | None = None,
        constraints: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> JSON:
        """CreateGrant: returns ``GrantId`` and ``GrantToken``.

        A retry with the same Name and parameters returns the same GrantId (and a new
        token). Security: the token is returned once and never stored; the ledger keeps
        only the SHA-256 of its secret part. Raises ValidationError, NotFoundError,
        DisabledError/KMSInvalidStateError.
        """
        request: JSON = {
            "keyId": key_id,
            "granteePrincipal": grantee_principal,
            "operations": operations,
        }
        if retiring_principal is not None:
            request["retiringPrincipal"] = retiring_principal
        if constraints is not None:  # CloudTrail spells the members in camelCase
            request["constraints"] = {
                k[:1].lower() + k[1:]: v for k, v in dict(constraints).items()
            }
        if name is not None:
            request["name"] = name
        issued: dict[str, str] = {}

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.check("CreateGrant")
            spec = grants.validate_create_grant(
                key_arn=key.arn,
                key_spec=key.key_spec,
                key_usage=key.key_usage,
                issuing_account=f"arn:aws:iam::{key.arn.split(':')[4]}:root",
                grantee_principal=grantee_principal,
                operations=operations,
                retiring_principal=retiring_principal,
                constraints=constraints,
                name=name,
            )
            existing = [
                (gid, grants.GrantSpec.from_json(g["grant"])) for gid, g in key.grants.items()
            ]
            grant_id = grants.find_same_grant(existing, spec) or grants.new_grant_id(os.urandom(32))
            secret = os.urandom(grants.TOKEN_SECRET_BYTES)
            key.create_grant(
                call=call,
                timestamp=now,
                request=request,
                grant_id=grant_id,
                grant=spec.to_json(),
                token_digest=grants.token_digest(secret),
            )
            issued["GrantId"] = grant_id
            issued["GrantToken"] = grants.make_grant_token(UUID(key.key_id), grant_id, secret)
            return dict(issued)

        return self._key_command("CreateGrant", caller, key_id, request, change)

    def grant_entries(self, key: Key) -> list[JSON]:
        """ListGrants entries of a loaded key, oldest first."""
        out = []
        for gid, g in sorted(key.grants.items(), key=lambda kv: (kv[1]["creation_date"], kv[0])):
            entry: JSON = {**g["grant"], "GrantId": gid}
            entry["CreationDate"] = datetime.fromisoformat(g["creation_date"]).timestamp()
            out.append(entry)
        return out

    def list_grants(
        self,
        *,
        caller: Caller,
        key_id: str,
        limit: int | None = None,
        marker: str | None = None,
        grant_id: str | None = None,
        grantee_principal: str | None = None,
    ) -> JSON:
        """ListGrants of one key, optionally filtered by GrantId or GranteePrincipal."""

        def answer(key: Key) -> JSON:
            if grant_id is not None:
                grants.check_grant_id(grant_id)
            rows = [
                e
                for e in self.grant_entries(key)
                if (grant_id is None or e["GrantId"] == grant_id)
                and (grantee_principal is None or e["GranteePrincipal"] == grantee_principal)
            ]
            page, fields = paginate(rows, limit=limit, marker=marker)
            return {"Grants": page, **fields}

        request: JSON = {
            "keyId": key_id,
            "grantId": grant_id,
            "granteePrincipal": grantee_principal,
            "limit": limit,
            "marker": marker,
        }
        return self._read("ListGrants", caller, request, key_id, answer)

    def retire_grant(
        self,
        *,
        caller: Caller,
        grant_token: str | None = None,
        key_id: str | None = None,
        grant_id: str | None = None,
    ) -> JSON:
        """RetireGrant by GrantToken, or by KeyId (ARN) and GrantId.

        Raises InvalidGrantTokenError for a malformed or unknown token, InvalidGrantIdError,
        NotFoundError, ValidationError when neither form is given. Who may retire (retiring
        principal, grantee with RetireGrant) is enforced with authorization (issue 5).
        """
        request: JSON = {}
        if key_id is not None:
            request["keyId"] = key_id
        if grant_id is not None:
            request["grantId"] = grant_id
        target: dict[str, Any] = {}

        def prepare() -> None:
            if grant_token is not None:
                key_uuid, gid, secret = grants.parse_grant_token(grant_token)
                target.update(key=str(key_uuid), grant_id=gid, secret=secret)
            elif key_id is not None and grant_id is not None:
                target.update(key=key_id, grant_id=grants.check_grant_id(grant_id))
            else:
                raise ValidationError("Either GrantToken, or both KeyId and GrantId, are required.")

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            prepare()

            def change(key: Key, call: CallContext, now: datetime) -> JSON:
                gid = str(target["grant_id"])
                entry = key.grants.get(gid)
                if "secret" in target:
                    if entry is None:
                        raise InvalidGrantTokenError("Invalid grant token.")
                    grants.verify_token_secret(target["secret"], entry["token_digests"])
                # The retiring principal and a grantee with RetireGrant need no policy.
                if entry is None or not grants.can_retire(
                    grants.GrantSpec.from_json(entry["grant"]), call.principal
                ):
                    self._authorize_key(attempt, key)
                key.end_grant(call=call, timestamp=now, request=request, grant_id=gid, revoke=False)
                return {}

            def step() -> tuple[Any, JSON]:
                if "secret" in target:  # the token names the key: any account, this region
                    key = self.load_key(UUID(str(target["key"])), for_update=True)
                    if key.arn.split(":")[3] != call.region:
                        raise NotFoundError(f"Key '{key.arn}' does not exist")
                    attempt.key_arn = key.arn
                else:
                    key = self._key_for(str(target["key"]), attempt, for_update=True,
                                        authorize=False)  # fmt: skip
                return key, change(key, call, self.clock.now())

            return self._save_retrying(step)

        return self._run("RetireGrant", caller, request, body, read_only=False)

    def revoke_grant(self, *, caller: Caller, key_id: str, grant_id: str) -> JSON:
        """RevokeGrant. Raises InvalidGrantIdError, NotFoundError."""
        request: JSON = {"keyId": key_id, "grantId": grant_id}

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.end_grant(call=call, timestamp=now, request=request, grant_id=grant_id, revoke=True)
            return {}

        def prepare() -> None:
            grants.check_grant_id(grant_id)

        return self._key_command("RevokeGrant", caller, key_id, request, change, prepare=prepare)

    # ------------------------------------------------------------ data keys, random

    def _open_blob(
        self,
        operation: str,
        ciphertext_blob: bytes,
        key_id: str | None,
        encryption_context: Mapping[str, str] | None,
        encryption_algorithm: str | None,
        attempt: _Attempt,
    ) -> tuple[Key, MaterialRef, bytes, str]:
        """Validate, resolve and decrypt a ciphertext blob inside the HSM (no record).

        Raises InvalidCiphertextError (any blob that does not authenticate, one error,
        no detail), IncorrectKeyError, NotFoundError, DisabledError, ValidationError.
        """
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
        side = "source" if operation == "ReEncrypt" else None
        named = (
            self._key_for(key_id, attempt, allow_alias=True, side=side)
            if key_id is not None
            else None
        )
        if named is not None and named.key_spec in RSA_MODULUS_BYTES:
            return self._rsa_decrypt(named, operation, bytes(ciphertext_blob), algorithm, context)
        env = envelope.parse(bytes(ciphertext_blob))
        if named is not None and UUID(named.key_id) != env.key_id:
            raise IncorrectKeyError(INCORRECT_KEY_MESSAGE)
        if named is not None:
            key = named
        else:
            try:
                key = self.load_key(env.key_id)
            except NotFoundError:
                raise InvalidCiphertextError("") from None
            if key.arn.split(":")[3] != self._scope()[1]:
                raise InvalidCiphertextError("")  # a key of another region: not found here
            attempt.key_arn = key.arn
            self._authorize_key(attempt, key, side=side)
        key.check(operation)
        self._check_usage(key, "ENCRYPT_DECRYPT", operation)
        if algorithm != SYMMETRIC_DEFAULT:
            raise IncorrectKeyError(INCORRECT_KEY_MESSAGE)
        try:
            material = key.material_version(env.version)
        except KeyError:
            raise InvalidCiphertextError("") from None
        plaintext = self.keystore.decrypt(
            material, env.iv, env.ciphertext, envelope.aad(env.key_id, env.version, context)
        )
        return key, material, plaintext, algorithm

    @staticmethod
    def _check_usage(key: Key, usage: str, operation: str) -> None:
        """InvalidKeyUsageError, as AWS words it, unless the key has ``usage``."""
        if key.key_usage != usage:
            raise InvalidKeyUsageError(
                f"{key.arn} key usage is {key.key_usage} which is not valid for {operation}."
            )

    def _seal(
        self, key: Key, plaintext: bytes, context: Mapping[str, str], operation: str = "Encrypt"
    ) -> tuple[bytes, str]:
        """Encrypt under the key's newest backing version inside the HSM; the blob and
        the material id (no record). Raises InvalidKeyUsageError for non-encryption keys
        and for asymmetric keys (data keys and envelopes need a symmetric key)."""
        self._check_usage(key, "ENCRYPT_DECRYPT", operation)
        if key.key_spec != SYMMETRIC_DEFAULT:
            raise InvalidKeyUsageError(
                f"{key.arn} key spec {key.key_spec} is not valid for {operation}; "
                "use a symmetric encryption key."
            )
        material = key.current_material
        version = key.version_number
        key_uuid = UUID(key.key_id)
        iv, ct = self.keystore.encrypt(
            material, plaintext, envelope.aad(key_uuid, version, context)
        )
        blob = envelope.Envelope(key_id=key_uuid, version=version, iv=iv, ciphertext=ct)
        return blob.to_bytes(), material.material_id

    @staticmethod
    def _data_key_size(key_spec: str | None, number_of_bytes: int | None) -> int:
        if key_spec is not None and number_of_bytes is not None:
            raise ValidationError("Please specify either number of bytes or key spec.")
        if key_spec is None and number_of_bytes is None:
            raise ValidationError("Please specify either number of bytes or key spec.")
        if key_spec is not None:
            if key_spec not in DATA_KEY_SPECS:
                raise enum_error("keySpec", key_spec, tuple(DATA_KEY_SPECS))
            return DATA_KEY_SPECS[key_spec]
        assert number_of_bytes is not None
        check_range("numberOfBytes", number_of_bytes, 1, 1024)
        return number_of_bytes

    def _generate_data_key(
        self,
        operation: str,
        caller: Caller,
        key_id: str,
        key_spec: str | None,
        number_of_bytes: int | None,
        encryption_context: Mapping[str, str] | None,
        *,
        with_plaintext: bool,
    ) -> JSON:
        request: JSON = {"keyId": key_id}
        if key_spec is not None:
            request["keySpec"] = key_spec
        if number_of_bytes is not None:
            request["numberOfBytes"] = number_of_bytes
        if isinstance(encryption_context, Mapping):
            request["encryptionContext"] = dict(encryption_context)

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            context = self._check_context(encryption_context)
            size = self._data_key_size(key_spec, number_of_bytes)
            key = self._key_for(key_id, attempt, allow_alias=True)
            key.check(operation)
            plaintext = self.keystore.generate_random(size)
            blob, material_id = self._seal(key, plaintext, context, operation)
            self._record_use(call, key.arn, request, material_id)
            out: JSON = {"CiphertextBlob": blob, "KeyId": key.arn, "KeyMaterialId": material_id}
            if with_plaintext:
                out["Plaintext"] = plaintext
            return out

        return self._run(operation, caller, request, body, read_only=True)

    def generate_data_key(
        self,
        *,
        caller: Caller,
        key_id: str,
        key_spec: str | None = None,
        number_of_bytes: int | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> JSON:
        """GenerateDataKey: exactly 16 (AES_128), 32 (AES_256) or NumberOfBytes (1-1024)
        bytes from the HSM's RNG, returned in plaintext and encrypted under the key.

        Security: the plaintext data key is returned to the caller only; it never
        reaches the record. Raises ValidationError, NotFoundError, DisabledError,
        KMSInvalidStateError, InvalidKeyUsageError, LedgerUnavailableError.
        """
        return self._generate_data_key(
            "GenerateDataKey", caller, key_id, key_spec, number_of_bytes, encryption_context,
            with_plaintext=True,
        )  # fmt: skip

    def generate_data_key_without_plaintext(
        self,
        *,
        caller: Caller,
        key_id: str,
        key_spec: str | None = None,
        number_of_bytes: int | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> JSON:
        """GenerateDataKeyWithoutPlaintext: only the encrypted data key is returned."""
        return self._generate_data_key(
            "GenerateDataKeyWithoutPlaintext", caller, key_id, key_spec, number_of_bytes,
            encryption_context, with_plaintext=False,
        )  # fmt: skip

    def re_encrypt(
        self,
        *,
        caller: Caller,
        ciphertext_blob: bytes,
        destination_key_id: str,
        source_key_id: str | None = None,
        source_encryption_context: Mapping[str, str] | None = None,
        destination_encryption_context: Mapping[str, str] | None = None,
        source_encryption_algorithm: str | None = None,
        destination_encryption_algorithm: str | None = None,
    ) -> JSON:
        """ReEncrypt: decrypt under the source key and context, encrypt under the
        destination key and context, all inside the HSM; the plaintext never leaves
        the service. One record, on the destination key, names the source key.

        Raises what Decrypt and Encrypt raise.
        """
        request: JSON = {
            "destinationKeyId": destination_key_id,
            "sourceEncryptionAlgorithm": source_encryption_algorithm or SYMMETRIC_DEFAULT,
            "destinationEncryptionAlgorithm": destination_encryption_algorithm or SYMMETRIC_DEFAULT,
        }
        if source_key_id is not None:
            request["sourceKeyId"] = source_key_id
        if isinstance(source_encryption_context, Mapping):
            request["sourceEncryptionContext"] = dict(source_encryption_context)
        if isinstance(destination_encryption_context, Mapping):
            request["destinationEncryptionContext"] = dict(destination_encryption_context)

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            dest_context = self._check_context(destination_encryption_context)
            dest_algorithm = self._check_algorithm(destination_encryption_algorithm)
            source, source_material, plaintext, source_algorithm = self._open_blob(
                "ReEncrypt", ciphertext_blob, source_key_id, source_encryption_context,
                source_encryption_algorithm, attempt,
            )  # fmt: skip
            dest = self._key_for(destination_key_id, attempt, allow_alias=True, side="destination")
            dest.check("ReEncrypt")
            if dest.key_spec in RSA_MODULUS_BYTES:
                blob, material_id = self._rsa_encrypt(dest, plaintext, dest_algorithm, dest_context)
            elif dest_algorithm != SYMMETRIC_DEFAULT:
                raise IncorrectKeyError(INCORRECT_KEY_MESSAGE)
            else:
                blob, material_id = self._seal(dest, plaintext, dest_context, "ReEncrypt")
            self._record_success(
                call,
                dest.arn,
                request,
                {
                    "sourceKeyArn": source.arn,
                    "sourceKeyMaterialId": source_material.material_id,
                    "keyMaterialId": material_id,
                },
            )
            return {
                "CiphertextBlob": blob,
                "SourceKeyId": source.arn,
                "KeyId": dest.arn,
                "SourceEncryptionAlgorithm": source_algorithm,
                "DestinationEncryptionAlgorithm": dest_algorithm,
                "SourceKeyMaterialId": source_material.material_id,
                "DestinationKeyMaterialId": material_id,
            }

        return self._run("ReEncrypt", caller, request, body, read_only=True)

    def generate_random(self, *, caller: Caller, number_of_bytes: int | None = None) -> JSON:
        """GenerateRandom: 1-1024 bytes from the HSM's RNG.

        Security: the bytes are returned only; the record holds the count.
        Raises ValidationError ("NumberOfBytes is required." when missing).
        """
        request: JSON = {} if number_of_bytes is None else {"numberOfBytes": number_of_bytes}

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            self._authorize_identity(attempt, "kms:GenerateRandom")
            if number_of_bytes is None:
                raise ValidationError("NumberOfBytes is required.")
            check_range("numberOfBytes", number_of_bytes, 1, 1024)
            data = self.keystore.generate_random(number_of_bytes)
            self._record_success(call, None, request, None)
            return {"Plaintext": data}

        return self._run("GenerateRandom", caller, request, body, read_only=True)

    # ------------------------------------------------------------ HMAC

    def _mac(
        self,
        operation: str,
        key_id: str,
        message: bytes,
        mac_algorithm: str,
        attempt: _Attempt,
    ) -> tuple[Key, MaterialRef, bytes]:
        if mac_algorithm not in MAC_ALGORITHMS:
            raise enum_error("macAlgorithm", mac_algorithm, MAC_ALGORITHMS)
        if not isinstance(message, bytes | bytearray) or len(message) < 1:
            raise validation_error("message", "Member must have length greater than or equal to 1")
        if len(message) > MAX_PLAINTEXT:
            raise validation_error("message", "Member must have length less than or equal to 4096")
        key = self._key_for(key_id, attempt, allow_alias=True)
        key.check(operation)
        self._check_usage(key, "GENERATE_VERIFY_MAC", operation)
        if HMAC_MAC_ALGORITHM.get(key.key_spec) != mac_algorithm:
            raise InvalidKeyUsageError(
                f"Algorithm {mac_algorithm} is incompatible with key spec {key.key_spec}."
            )
        material = key.current_material
        return key, material, self.keystore.generate_mac(material, mac_algorithm, bytes(message))

    def generate_mac(
        self, *, caller: Caller, key_id: str, message: bytes, mac_algorithm: str
    ) -> JSON:
        """GenerateMac: HMAC of up to 4096 bytes inside the HSM with an HMAC key.

        Security: neither message nor MAC reaches the record. Raises ValidationError,
        InvalidKeyUsageError, NotFoundError, DisabledError, KMSInvalidStateError.
        """
        request: JSON = {"keyId": key_id, "macAlgorithm": mac_algorithm}

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            key, material, mac = self._mac("GenerateMac", key_id, message, mac_algorithm, attempt)
            self._record_use(call, key.arn, request, material.material_id)
            return {"Mac": mac, "MacAlgorithm": mac_algorithm, "KeyId": key.arn}

        return self._run("GenerateMac", caller, request, body, read_only=True)

    def verify_mac(
        self, *, caller: Caller, key_id: str, message: bytes, mac_algorithm: str, mac: bytes
    ) -> JSON:
        """VerifyMac: recompute the HMAC inside the HSM and compare in constant time.

        Raises KMSInvalidMacError when the MAC does not match (recorded as a failure),
        and what GenerateMac raises.
        """
        request: JSON = {"keyId": key_id, "macAlgorithm": mac_algorithm}

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            if not isinstance(mac, bytes | bytearray) or not 1 <= len(mac) <= 6144:
                raise validation_error("mac", "Member must have length between 1 and 6144")
            key, material, expected = self._mac(
                "VerifyMac", key_id, message, mac_algorithm, attempt
            )
            if not hmac.compare_digest(expected, bytes(mac)):
                raise KMSInvalidMacError("")
            self._record_use(call, key.arn, request, material.material_id)
            return {"KeyId": key.arn, "MacValid": True, "MacAlgorithm": mac_algorithm}

        return self._run("VerifyMac", caller, request, body, read_only=True)

    # ------------------------------------------------------------ asymmetric signing

    def _signing_key(
        self, operation: str, key_id: str, signing_algorithm: str, attempt: _Attempt
    ) -> Key:
        if signing_algorithm not in SIGNING_ALGORITHMS:
            raise enum_error("signingAlgorithm", signing_algorithm, SIGNING_ALGORITHMS)
        key = self._key_for(key_id, attempt, allow_alias=True)
        key.check(operation)
        self._check_usage(key, "SIGN_VERIFY", operation)
        if signing_algorithm not in SIGNING_ALGORITHMS_BY_SPEC.get(key.key_spec, []):
            raise InvalidKeyUsageError(
                f"Algorithm {signing_algorithm} is incompatible with key spec {key.key_spec}."
            )
        return key

    @staticmethod
    def _digest(message: bytes, message_type: str | None, signing_algorithm: str) -> bytes:
        """The digest to sign or verify: RAW messages (<= 4096 bytes) are hashed here;
        DIGEST messages must already have the algorithm's hash length."""
        kind = message_type or "RAW"
        if kind not in ("RAW", "DIGEST"):
            raise enum_error("messageType", kind, ("RAW", "DIGEST"))
        if not isinstance(message, bytes | bytearray) or len(message) < 1:
            raise validation_error("message", "Member must have length greater than or equal to 1")
        if len(message) > MAX_PLAINTEXT:
            raise validation_error("message", "Member must have length less than or equal to 4096")
        size = digest_length(signing_algorithm)
        if kind == "DIGEST":
            if len(message) != size:
                raise ValidationError(
                    f"Digest is invalid length for algorithm {signing_algorithm}."
                )
            return bytes(message)
        return hashlib.new(f"sha{size * 8}", bytes(message)).digest()

    def get_public_key(self, *, caller: Caller, key_id: str) -> JSON:
        """GetPublicKey: the DER SubjectPublicKeyInfo of an asymmetric key.

        Raises UnsupportedOperationError for symmetric and HMAC keys.
        """

        def answer(key: Key) -> JSON:
            public = key.public_key
            if public is None:
                raise UnsupportedOperationError(
                    f"{key.arn} key spec {key.key_spec} is not valid for GetPublicKey."
                )
            return {
                "KeyId": key.arn,
                "PublicKey": public,
                "CustomerMasterKeySpec": key.key_spec,
                "KeySpec": key.key_spec,
                "KeyUsage": key.key_usage,
                **key_algorithms(key.key_spec, key.key_usage),
            }

        return self._read(
            "GetPublicKey", caller, {"keyId": key_id}, key_id, answer, allow_alias=True
        )

    def sign(
        self,
        *,
        caller: Caller,
        key_id: str,
        message: bytes,
        signing_algorithm: str,
        message_type: str | None = None,
    ) -> JSON:
        """Sign: the private key signs inside the HSM; RAW messages are hashed on the
        host first (only the digest enters the HSM). ECDSA signatures are DER, RSA
        signatures raw, as AWS returns them.

        Security: neither message nor signature reaches the record. Raises
        ValidationError, InvalidKeyUsageError, NotFoundError, DisabledError,
        KMSInvalidStateError.
        """
        request: JSON = {
            "keyId": key_id,
            "messageType": message_type or "RAW",
            "signingAlgorithm": signing_algorithm,
        }

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            key = self._signing_key("Sign", key_id, signing_algorithm, attempt)
            digest = self._digest(message, message_type, signing_algorithm)
            material = key.current_material
            signature = self.keystore.sign(material, signing_algorithm, digest)
            self._record_use(call, key.arn, request, material.material_id)
            return {"KeyId": key.arn, "Signature": signature, "SigningAlgorithm": signing_algorithm}

        return self._run("Sign", caller, request, body, read_only=True)

    def verify(
        self,
        *,
        caller: Caller,
        key_id: str,
        message: bytes,
        signature: bytes,
        signing_algorithm: str,
        message_type: str | None = None,
    ) -> JSON:
        """Verify a signature with the key's public key (no secret is involved, so this
        runs on the host with ``cryptography``).

        Raises KMSInvalidSignatureError for a signature that does not verify (recorded),
        and what Sign raises.
        """
        request: JSON = {
            "keyId": key_id,
            "messageType": message_type or "RAW",
            "signingAlgorithm": signing_algorithm,
        }

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            key = self._signing_key("Verify", key_id, signing_algorithm, attempt)
            digest = self._digest(message, message_type, signing_algorithm)
            if not isinstance(signature, bytes | bytearray) or not 1 <= len(signature) <= 6144:
                raise validation_error("signature", "Member must have length between 1 and 6144")
            public = key.public_key
            assert public is not None
            if not signatures.verify_digest(public, signing_algorithm, digest, bytes(signature)):
                raise KMSInvalidSignatureError("")
            self._record_use(call, key.arn, request, key.current_material.material_id)
            return {"KeyId": key.arn, "SignatureValid": True, "SigningAlgorithm": signing_algorithm}

        return self._run("Verify", caller, request, body, read_only=True)

    # ------------------------------------------------------------ RSA encryption

    def _rsa_checks(
        self, key: Key, operation: str, algorithm: str, context: Mapping[str, str]
    ) -> None:
        self._check_usage(key, "ENCRYPT_DECRYPT", operation)
        if algorithm not in RSA_ENCRYPTION_ALGORITHMS:
            raise InvalidKeyUsageError(
                f"Algorithm {algorithm} is incompatible with key spec {key.key_spec}."
            )
        if context:
            raise ValidationError("EncryptionContext is not supported with asymmetric KMS keys.")

    def _rsa_encrypt(
        self, key: Key, plaintext: bytes, algorithm: str, context: Mapping[str, str]
    ) -> tuple[bytes, str]:
        """RSAES-OAEP with the public key, on the host (no secret involved), within
        AWS's plaintext limit for the key spec and algorithm."""
        self._rsa_checks(key, "Encrypt", algorithm, context)
        limit = rsa_max_plaintext(key.key_spec, algorithm)
        if len(plaintext) > limit:
            raise ValidationError(
                f"Algorithm {algorithm} and key spec {key.key_spec} cannot encrypt data "
                f"larger than {limit} bytes."
            )
        public = key.public_key
        assert public is not None
        material_id = key.current_material_id
        assert material_id is not None
        return signatures.rsa_encrypt(public, algorithm, plaintext), material_id

    def _rsa_decrypt(
        self,
        key: Key,
        operation: str,
        ciphertext: bytes,
        algorithm: str,
        context: Mapping[str, str],
    ) -> tuple[Key, MaterialRef, bytes, str]:
        """RSAES-OAEP decryption with the private key inside the HSM."""
        key.check(operation)
        self._rsa_checks(key, operation, algorithm, context)
        material = key.current_material
        return key, material, self.keystore.decrypt_rsa(material, algorithm, ciphertext), algorithm

    # ------------------------------------------------------------ key agreement

    def derive_shared_secret(
        self,
        *,
        caller: Caller,
        key_id: str,
        key_agreement_algorithm: str,
        public_key: bytes,
    ) -> JSON:
        """DeriveSharedSecret: ECDH inside the HSM between the key's private key and the
        peer's DER public key.

        Security: the shared secret is returned only, never recorded. Raises
        ValidationError, InvalidKeyUsageError, NotFoundError, DisabledError,
        KMSInvalidStateError.
        """
        request: JSON = {"keyId": key_id, "keyAgreementAlgorithm": key_agreement_algorithm}

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            if key_agreement_algorithm != "ECDH":
                raise enum_error("keyAgreementAlgorithm", key_agreement_algorithm, ("ECDH",))
            if not isinstance(public_key, bytes | bytearray) or not 1 <= len(public_key) <= 8192:
                raise validation_error("publicKey", "Member must have length between 1 and 8192")
            key = self._key_for(key_id, attempt, allow_alias=True)
            key.check("DeriveSharedSecret")
            self._check_usage(key, "KEY_AGREEMENT", "DeriveSharedSecret")
            material = key.current_material
            secret = self.keystore.derive_shared_secret(material, bytes(public_key))
            self._record_use(call, key.arn, request, material.material_id)
            return {
                "KeyId": key.arn,
                "SharedSecret": secret,
                "KeyAgreementAlgorithm": "ECDH",
                "KeyOrigin": key.origin,
            }

        return self._run("DeriveSharedSecret", caller, request, body, read_only=True)

    # ------------------------------------------------------------ data key pairs

    def _generate_data_key_pair(
        self,
        operation: str,
        caller: Caller,
        key_id: str,
        key_pair_spec: str,
        encryption_context: Mapping[str, str] | None,
        *,
        with_plaintext: bool,
    ) -> JSON:
        request: JSON = {"keyId": key_id, "keyPairSpec": key_pair_spec}
        if isinstance(encryption_context, Mapping):
            request["encryptionContext"] = dict(encryption_context)

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            context = self._check_context(encryption_context)
            if key_pair_spec not in KEY_PAIR_SPECS:
                raise enum_error("keyPairSpec", key_pair_spec, KEY_PAIR_SPECS)
            key = self._key_for(key_id, attempt, allow_alias=True)
            key.check(operation)
            private_der, public_der = self.keystore.generate_data_key_pair(key_pair_spec)
            blob, material_id = self._seal(key, private_der, context, operation)
            self._record_use(call, key.arn, request, material_id)
            out: JSON = {
                "PrivateKeyCiphertextBlob": blob,
                "PublicKey": public_der,
                "KeyId": key.arn,
                "KeyPairSpec": key_pair_spec,
                "KeyMaterialId": material_id,
            }
            if with_plaintext:
                out["PrivateKeyPlaintext"] = private_der
            return out

        return self._run(operation, caller, request, body, read_only=True)

    def generate_data_key_pair(
        self,
        *,
        caller: Caller,
        key_id: str,
        key_pair_spec: str,
        encryption_context: Mapping[str, str] | None = None,
    ) -> JSON:
        """GenerateDataKeyPair: a new RSA or ECC key pair for use outside KMS; the
        private key (PKCS#8 DER) comes back in plaintext and encrypted under the
        symmetric KMS key, the public key as DER SubjectPublicKeyInfo.

        The pair is generated inside the HSM as an extractable data key pair (the caller
        receives the private key in plaintext by design) and its private key encrypted
        under the symmetric key inside the HSM. Nothing of the pair is recorded.
        """
        return self._generate_data_key_pair(
            "GenerateDataKeyPair", caller, key_id, key_pair_spec, encryption_context,
            with_plaintext=True,
        )  # fmt: skip

    def generate_data_key_pair_without_plaintext(
        self,
        *,
        caller: Caller,
        key_id: str,
        key_pair_spec: str,
        encryption_context: Mapping[str, str] | None = None,
    ) -> JSON:
        """GenerateDataKeyPairWithoutPlaintext: only the encrypted private key and the
        public key are returned."""
        return self._generate_data_key_pair(
            "GenerateDataKeyPairWithoutPlaintext", caller, key_id, key_pair_spec,
            encryption_context, with_plaintext=False,
        )  # fmt: skip

    # ------------------------------------------------------------ imported key material

    def get_parameters_for_import(
        self, *, caller: Caller, key_id: str, wrapping_algorithm: str, wrapping_key_spec: str
    ) -> JSON:
        """GetParametersForImport for an EXTERNAL-origin key: an RSA wrapping public key
        made in the HSM and an import token valid for 24 hours.

        Security: the token is returned once; the ledger keeps only a digest of its
        secret. Raises ValidationError, UnsupportedOperationError, NotFoundError,
        KMSInvalidStateError.
        """
        request: JSON = {
            "keyId": key_id,
            "wrappingAlgorithm": wrapping_algorithm,
            "wrappingKeySpec": wrapping_key_spec,
        }
        issued: dict[str, Any] = {}

        def prepare() -> None:
            if wrapping_algorithm not in WRAPPING_ALGORITHMS:
                raise enum_error("wrappingAlgorithm", wrapping_algorithm, WRAPPING_ALGORITHMS)
            if wrapping_key_spec not in WRAPPING_KEY_SPECS:
                raise enum_error("wrappingKeySpec", wrapping_key_spec, WRAPPING_KEY_SPECS)

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.check("GetParametersForImport")
            key._check_external()
            if not issued:
                wrapping, public = self.keystore.new_import_wrapping_key(wrapping_key_spec)
                issued.update(wrapping=wrapping, public=public)
            parameters_id = grants.new_grant_id(os.urandom(32))
            secret = os.urandom(grants.TOKEN_SECRET_BYTES)
            key.issue_import_parameters(
                call=call, timestamp=now, request=request, wrapping=issued["wrapping"],
                wrapping_algorithm=wrapping_algorithm, wrapping_key_spec=wrapping_key_spec,
                parameters_id=parameters_id, token_digest=grants.token_digest(secret),
            )  # fmt: skip
            assert key.import_params is not None
            token = grants.make_grant_token(UUID(key.key_id), parameters_id, secret)
            return {
                "KeyId": key.arn,
                "ImportToken": token.encode("ascii"),
                "PublicKey": issued["public"],
                "ParametersValidTo": datetime.fromisoformat(
                    key.import_params["valid_to"]
                ).timestamp(),
            }

        return self._key_command(
            "GetParametersForImport", caller, key_id, request, change, prepare=prepare
        )

    def import_key_material(
        self,
        *,
        caller: Caller,
        key_id: str,
        import_token: bytes,
        encrypted_key_material: bytes,
        expiration_model: str | None = None,
        valid_to: datetime | None = None,
    ) -> JSON:
        """ImportKeyMaterial: unwrap the material inside the HSM with the wrapping key
        of the latest GetParametersForImport; the key becomes Enabled.

        Raises InvalidImportTokenError, ExpiredImportTokenError, InvalidCiphertextError
        (material not wrapped with that key, or corrupted), ValidationError (length,
        ExpirationModel/ValidTo), UnsupportedOperationError, KMSInvalidStateError.
        """
        model = expiration_model or (
            "KEY_MATERIAL_EXPIRES" if valid_to is not None else "KEY_MATERIAL_DOES_NOT_EXPIRE"
        )
        request: JSON = {"keyId": key_id, "expirationModel": model}
        if valid_to is not None:
            request["validTo"] = valid_to.isoformat()

        def prepare() -> None:
            if model not in EXPIRATION_MODELS:
                raise enum_error("expirationModel", model, EXPIRATION_MODELS)
            if model == "KEY_MATERIAL_EXPIRES" and valid_to is None:
                raise ValidationError(
                    "A validTo date must be set if the ExpirationModel is KEY_MATERIAL_EXPIRES"
                )
            if model == "KEY_MATERIAL_DOES_NOT_EXPIRE" and valid_to is not None:
                raise ValidationError(
                    "A validTo date must not be set if the ExpirationModel is "
                    "KEY_MATERIAL_DOES_NOT_EXPIRE"
                )
            if not isinstance(encrypted_key_material, bytes | bytearray) or not (
                1 <= len(encrypted_key_material) <= 6144
            ):
                raise validation_error(
                    "encryptedKeyMaterial", "Member must have length between 1 and 6144"
                )

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.check("ImportKeyMaterial")
            key._check_external()
            params = key.import_params
            try:
                token_key, parameters_id, secret = grants.parse_grant_token(
                    bytes(import_token).decode("ascii")
                )
            except (InvalidGrantTokenError, UnicodeError, TypeError):
                raise InvalidImportTokenError("Invalid import token.") from None
            if (
                params is None
                or token_key != UUID(key.key_id)
                or parameters_id != params["parameters_id"]
            ):
                raise InvalidImportTokenError("Invalid import token.")
            try:
                grants.verify_token_secret(secret, [params["token_digest"]])
            except InvalidGrantTokenError:
                raise InvalidImportTokenError("Invalid import token.") from None
            if datetime.fromisoformat(params["valid_to"]) < now:
                raise ExpiredImportTokenError("The import token is expired.")
            if valid_to is not None and valid_to <= now:
                raise ValidationError("ValidTo must be in the future.")
            kind = "AES" if key.key_spec == SYMMETRIC_DEFAULT else key.key_spec
            material = self.keystore.import_key_material(
                material_from_json(params["wrapping"]),
                params["wrapping_algorithm"],
                bytes(encrypted_key_material),
                kind,
                kek_label(key.key_id),
            )
            key.import_material(
                call=call, timestamp=now, request=request, material=material,
                expiration_model=model, valid_to=valid_to,
            )  # fmt: skip
            return {"KeyId": key.arn, "KeyMaterialId": material.material_id}

        return self._key_command(
            "ImportKeyMaterial", caller, key_id, request, change, prepare=prepare
        )

    def delete_imported_key_material(self, *, caller: Caller, key_id: str) -> JSON:
        """DeleteImportedKeyMaterial: the key returns to PendingImport and refuses use
        until the same material is imported again."""
        request: JSON = {"keyId": key_id}

        def change(key: Key, call: CallContext, now: datetime) -> JSON:
            key.delete_imported_material(call=call, timestamp=now, request=request)
            for m in key.materials:
                self.keystore.forget(str(m["material_id"]))
            return {"KeyId": key.arn}

        return self._key_command("DeleteImportedKeyMaterial", caller, key_id, request, change)

    # ------------------------------------------------------------ principals

    def _principal_command(
        self,
        operation: str,
        action: str,
        caller: Caller,
        request: JSON,
        account: str,
        change: Callable[[CallContext, _Attempt, datetime], Any],
    ) -> JSON:
        """A principal-management call: identity-authorized (``iam:*`` actions), only
        within the caller's own account, saved with retries."""

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            self._authorize_principal_admin(attempt, action, account)
            out: JSON = {}

            def step() -> tuple[Any, JSON]:
                return change(call, attempt, self.clock.now()), out

            return self._save_retrying(step)

        return self._run(operation, caller, request, body, read_only=False)

    def _authorize_principal_admin(self, attempt: _Attempt, action: str, account: str) -> None:
        """Principal management: an ``iam:*`` identity action, only within the caller's
        own account. Raises AccessDeniedError."""
        assert attempt.call is not None
        self._authorize_identity(attempt, action)
        if account != attempt.call.account_id:
            raise AccessDeniedError(
                f"User: {attempt.call.principal} is not authorized to perform: {action} "
                f"on resource: account {account}"
            )

    def _load_principal(self, name: str, account: str, *, for_update: bool = False) -> Principal:
        """A live principal by name (user first, then role); raises NotFoundError."""
        for kind in ("user", "role"):
            agg: object
            try:
                agg = self.repository.get(
                    Principal.stream_id(principal_arn(account, kind, name)),
                    deepcopy_from_cache=for_update,
                )
            except AggregateNotFoundError:
                continue
            if isinstance(agg, Principal) and not agg.deleted:
                return agg
        raise NotFoundError(f"The principal with name {name} cannot be found.")

    def create_principal(
        self,
        *,
        caller: Caller,
        name: str,
        account: str | None = None,
        principal_type: str = "user",
    ) -> JSON:
        """Create a user or role with one access key.

        Returns ``{"Principal": {...}, "AccessKeyId", "SecretAccessKey"}``. Security: the
        secret is returned once and stored only sealed under an HSM-wrapped data key.
        Raises ValidationError, AlreadyExistsError, AccessDeniedError.
        """
        acct = account or self.scope_of(caller)[0]
        request: JSON = {"principalName": name, "account": acct, "principalType": principal_type}
        issued: JSON = {}

        def body(call: CallContext, attempt: _Attempt) -> JSON:
            check_principal_input(name, acct, principal_type)
            self._authorize_principal_admin(
                attempt, "iam:CreateRole" if principal_type == "role" else "iam:CreateUser", acct
            )
            arn = principal_arn(acct, principal_type, name)
            with contextlib.suppress(NotFoundError):
                existing = self._load_principal(name, acct)
                raise AlreadyExistsError(f"A principal with the name {name} already exists: "
                                         f"{existing.arn}")  # fmt: skip
            try:
                self.repository.get(Principal.stream_id(arn))
                raise AlreadyExistsError(f"The principal {arn} was deleted; use a new name.")
            except AggregateNotFoundError:
                pass
            akid = ACCESS_KEY_PREFIX + base64.b32encode(os.urandom(10)).decode("ascii")
            secret = base64.b64encode(os.urandom(30)).decode("ascii")
            sealed = self._seal_secret(akid, secret)
            now = self.clock.now()
            principal = Principal.create(
                call=call, timestamp=now, name=name, account=acct,
                principal_type=principal_type, access_key_id=akid, request=request,
            )  # fmt: skip
            key = AccessKey.create(
                call=dataclasses.replace(call, operation="CreateAccessKey"),
                timestamp=now, access_key_id=akid, principal_arn=arn,
                sealed=sealed, request={"principalName": name, "accessKeyId": akid},
            )  # fmt: skip
            self._commit(principal, key)
            issued.update(
                Principal=self.principal_doc(principal), AccessKeyId=akid, SecretAccessKey=secret
            )
            return issued

        return self._run(
            "CreateRole" if principal_type == "role" else "CreateUser",
            caller, request, body, read_only=False,
        )  # fmt: skip

    def _seal_secret(self, access_key_id: str, secret: str) -> JSON:
        material = self.keystore.generate_symmetric_key(kek=None)
        iv, ct = self.keystore.encrypt(
            material, secret.encode("ascii"), ("keyledger-access-key:" + access_key_id).encode()
        )
        return {
            "material": material_to_json(material),
            "iv": base64.b64encode(iv).decode("ascii"),
            "ct": base64.b64encode(ct).decode("ascii"),
        }

    def access_key_secret(self, access_key_id: str) -> tuple[str, Principal]:
        """The secret of an active access key and its enabled principal, for SigV4.

        Raises UnrecognizedClientError for an unknown, inactive or deleted key or
        principal. Security: the returned secret is plaintext; keep it in memory only.
        """
        invalid = UnrecognizedClientError("The security token included in the request is invalid.")
        if not access_key_id.startswith(ACCESS_KEY_PREFIX) or len(access_key_id) != 20:
            raise invalid
        agg: object
        try:
            agg = self._fresh(AccessKey.stream_id(access_key_id))
            if not isinstance(agg, AccessKey) or not agg.active:
                raise invalid
            owner: object = self._fresh(Principal.stream_id(agg.principal_arn))
        except AggregateNotFoundError:
            raise invalid from None
        if not isinstance(owner, Principal) or not owner.enabled:
            raise invalid
        sealed = agg.sealed
        secret = self.keystore.decrypt(
            material_from_json(sealed["material"]),
            base64.b64decode(sealed["iv"]),
            base64.b64decode(sealed["ct"]),
            ("keyledger-access-key:" + access_key_id).encode(),
        )
        return secret.decode("ascii"), owner

    def principal_doc(self, p: Principal) -> JSON:
        return {
            "Arn": p.arn,
            "Name": p.name,
            "Account": p.account,
            "Type": p.principal_type,
            "Enabled": p.enabled,
            "AccessKeyIds": list(p.access_key_ids),
            "Policies": sorted(p.policies),
            "CreateDate": p.created_date,
        }

    def describe_principal(self, *, name: str, account: str) -> JSON:
        """A principal's document with its policy texts. Raises NotFoundError."""
        p = self._load_principal(name, account)
        return {**self.principal_doc(p), "PolicyDocuments": dict(p.policies)}

    def list_principals(self, *, account: str | None = None) -> list[JSON]:
        """Live principals (optionally of one account), by ARN."""
        topic = f"{Principal.__module__}:{Principal.Created.__qualname__}"
        with self.db.transaction(commit=False) as c:
            rows = c.execute(
                "SELECT originator_id FROM {events} WHERE topic = ?", (topic,)
            ).fetchall()
        out = []
        for row in rows:
            agg: object = self.repository.get(
                UUID(str(row["originator_id"])), deepcopy_from_cache=False
            )
            if not isinstance(agg, Principal) or agg.deleted:
                continue
            if account is None or agg.account == account:
                out.append(self.principal_doc(agg))
        return sorted(out, key=lambda d: d["Arn"])

    def _change_principal(
        self, operation: str, action: str, caller: Caller, name: str, account: str | None,
        extra: JSON, apply: Callable[[Principal, CallContext, datetime, JSON], None],
    ) -> JSON:  # fmt: skip
        acct = account or self.scope_of(caller)[0]
        request: JSON = {"principalName": name, "account": acct, **extra}

        def change(call: CallContext, attempt: _Attempt, now: datetime) -> Any:
            p = self._load_principal(name, acct, for_update=True)
            apply(p, call, now, request)
            return p

        return self._principal_command(operation, action, caller, request, acct, change)

    def set_principal_enabled(
        self, *, caller: Caller, name: str, enabled: bool, account: str | None = None
    ) -> JSON:
        """Enable or disable a principal (its access keys stop authenticating)."""

        def apply(p: Principal, call: CallContext, now: datetime, request: JSON) -> None:
            (p.enable if enabled else p.disable)(call=call, timestamp=now, request=request)

        op = "EnablePrincipal" if enabled else "DisablePrincipal"
        return self._change_principal(op, "iam:UpdateUser", caller, name, account, {}, apply)

    def delete_principal(self, *, caller: Caller, name: str, account: str | None = None) -> JSON:
        """Delete a principal; its access keys stop authenticating for good."""

        def apply(p: Principal, call: CallContext, now: datetime, request: JSON) -> None:
            p.delete(call=call, timestamp=now, request=request)

        return self._change_principal(
            "DeletePrincipal", "iam:DeleteUser", caller, name, account, {}, apply
        )

    def attach_principal_policy(
        self, *, caller: Caller, name: str, policy_name: str, policy: str,
        account: str | None = None,
    ) -> JSON:  # fmt: skip
        """Attach an identity policy. Raises MalformedPolicyDocumentError, NotFoundError."""

        def apply(p: Principal, call: CallContext, now: datetime, request: JSON) -> None:
            if len(policy.encode()) > MAX_POLICY_BYTES:
                raise LimitExceededError("The policy exceeds the maximum size of 32768 bytes.")
            self._policies.get(policy, identity=True)
            p.attach_policy(call=call, timestamp=now, request=request, name=policy_name,
                            policy=policy)  # fmt: skip

        return self._change_principal(
            "PutPrincipalPolicy", "iam:PutUserPolicy", caller, name, account,
            {"policyName": policy_name, "policyDocument": policy}, apply,
        )  # fmt: skip

    def detach_principal_policy(
        self, *, caller: Caller, name: str, policy_name: str, account: str | None = None
    ) -> JSON:
        """Detach an identity policy. Raises NotFoundError."""

        def apply(p: Principal, call: CallContext, now: datetime, request: JSON) -> None:
            p.detach_policy(call=call, timestamp=now, request=request, name=policy_name)

        return self._change_principal(
            "DeletePrincipalPolicy", "iam:DeleteUserPolicy", caller, name, account,
            {"policyName": policy_name}, apply,
        )  # fmt: skip
