"""Authorization: key policies, identity policies and grants, as AWS KMS evaluates them.

A call on a key is allowed when no applicable statement denies it and one of these
holds (AWS KMS "Determining access to a KMS key"):

* the key policy allows the principal directly (its ARN or ``*``) and the key is in
  the principal's account, or the principal's identity policies also allow it
  (cross-account use needs both sides);
* the key policy allows the principal's account (``arn:aws:iam::A:root``) and the
  principal is that root or its identity policies allow the action;
* an active grant names the principal as grantee for the operation and the request
  meets the grant's constraints.

Actions without a key (CreateKey, ListKeys, GenerateRandom, ...) need only the
identity side; an account root may do them all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ledger.domain import grants
from ledger.domain.principals import account_of, is_root
from ledger.errors import AccessDeniedError
from ledger.policy import AuthzRequest, Evaluation, Policy, evaluate, parse_policy

JSON = dict[str, Any]

# Operations whose IAM action is not "kms:<Operation>" for their key.
IDENTITY_ONLY_ACTIONS = frozenset(
    {
        "CreateKey",
        "ListKeys",
        "ListAliases",
        "GenerateRandom",
        "ListRetirableGrants",
        "CreateCustomKeyStore",
        "DescribeCustomKeyStores",
    }
)

# request member (camelCase, as recorded) -> condition key
_REQUEST_CONDITION_KEYS: dict[str, str] = {
    "encryptionAlgorithm": "kms:EncryptionAlgorithm",
    "signingAlgorithm": "kms:SigningAlgorithm",
    "macAlgorithm": "kms:MacAlgorithm",
    "keyAgreementAlgorithm": "kms:KeyAgreementAlgorithm",
    "keyPairSpec": "kms:DataKeyPairSpec",
    "messageType": "kms:MessageType",
    "granteePrincipal": "kms:GranteePrincipal",
    "retiringPrincipal": "kms:RetiringPrincipal",
    "operations": "kms:GrantOperations",
    "bypassPolicyLockoutSafetyCheck": "kms:BypassPolicyLockoutSafetyCheck",
    "pendingWindowInDays": "kms:ScheduleKeyDeletionPendingWindowInDays",
    "rotationPeriodInDays": "kms:RotationPeriodInDays",
    "wrappingAlgorithm": "kms:WrappingAlgorithm",
    "wrappingKeySpec": "kms:WrappingKeySpec",
    "expirationModel": "kms:ExpirationModel",
}


@dataclass(frozen=True)
class Principal:
    """The authenticated caller as authorization sees it."""

    arn: str
    account: str
    identity_policies: tuple[Policy, ...] = ()

    @property
    def root(self) -> bool:
        return is_root(self.arn)


class PolicyCache:
    """Parsed policies by their text (bounded LRU); thread-safe."""

    def __init__(self, size: int = 4096) -> None:
        self._items: OrderedDict[tuple[str, bool], Policy] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get(self, text: str, *, identity: bool = False) -> Policy:
        """The parsed policy; raises MalformedPolicyDocumentError for a bad document."""
        k = (text, identity)
        with self._lock:
            hit = self._items.get(k)
            if hit is not None:
                self._items.move_to_end(k)
                return hit
        parsed = parse_policy(text, identity=identity)
        with self._lock:
            self._items[k] = parsed
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return parsed


def action_for(operation: str, *, side: str | None = None) -> str:
    """The IAM action of an operation; ReEncrypt checks From and To separately."""
    if operation == "ReEncrypt":
        return "kms:ReEncryptFrom" if side == "source" else "kms:ReEncryptTo"
    return "kms:" + operation


class LazyContext(Mapping[str, object]):
    """A condition context built on first use (by ``build``): a decision that only
    context-free policies settle (``policy.Policy.context_free``) never builds it."""

    def __init__(self, build: Callable[[], dict[str, object]]) -> None:
        self._build: Callable[[], dict[str, object]] | None = build
        self._context: dict[str, object] = {}

    def _built(self) -> dict[str, object]:
        if self._build is not None:
            self._context, self._build = self._build(), None
        return self._context

    def __getitem__(self, key: str) -> object:
        return self._built()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())

    def items(self) -> ItemsView[str, object]:
        return self._built().items()


def condition_context(
    *,
    principal: Principal,
    source_ip: str | None,
    via_service: str | None,
    request: Mapping[str, Any],
    encryption_context: Mapping[str, str] | None,
    key: Any | None,
    now: datetime,
) -> dict[str, object]:
    """Condition keys for one request (names as AWS documents them)."""
    ctx: dict[str, object] = {
        "aws:PrincipalArn": principal.arn,
        "aws:PrincipalAccount": principal.account,
        "aws:PrincipalType": "Account" if principal.root else _principal_type(principal.arn),
        "aws:CurrentTime": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "aws:EpochTime": int(now.timestamp()),
        "aws:SecureTransport": False,
        "kms:CallerAccount": principal.account,
        # True only when an integrated AWS service calls on the user's behalf
        # (AWS KMS condition keys: kms:GrantIsForAWSResource).
        "kms:GrantIsForAWSResource": bool(via_service),
    }
    if not principal.root:
        ctx["aws:username"] = principal.arn.rsplit("/", 1)[-1]
    if source_ip:
        ctx["aws:SourceIp"] = source_ip
    if via_service:
        ctx["kms:ViaService"] = via_service
    if encryption_context is not None:
        for k, v in encryption_context.items():
            ctx["kms:EncryptionContext:" + k] = v
        ctx["kms:EncryptionContextKeys"] = list(encryption_context)
    for member, cond in _REQUEST_CONDITION_KEYS.items():
        if member in request and request[member] is not None:
            ctx[cond] = request[member]
    constraints = request.get("constraints")
    if isinstance(constraints, Mapping):
        kinds = [
            name
            for name, member in (
                ("EncryptionContextEquals", "encryptionContextEquals"),
                ("EncryptionContextSubset", "encryptionContextSubset"),
            )
            if member in constraints
        ]
        if kinds:
            ctx["kms:GrantConstraintType"] = kinds
    for member in ("keyId", "sourceKeyId", "destinationKeyId"):
        sent = request.get(member)
        if isinstance(sent, str) and (sent.startswith("alias/") or ":alias/" in sent):
            ctx["kms:RequestAlias"] = sent[sent.index("alias/") :]
    if "tags" in request and isinstance(request["tags"], list):
        keys = []
        for tag in request["tags"]:
            if isinstance(tag, Mapping) and isinstance(tag.get("TagKey"), str):
                keys.append(tag["TagKey"])
                ctx["aws:RequestTag/" + tag["TagKey"]] = tag.get("TagValue")
        ctx["aws:TagKeys"] = keys
    if "tagKeys" in request and isinstance(request["tagKeys"], list):
        ctx["aws:TagKeys"] = list(request["tagKeys"])
    if key is not None:
        ctx["kms:KeySpec"] = key.key_spec
        ctx["kms:CustomerMasterKeySpec"] = key.key_spec
        ctx["kms:KeyUsage"] = key.key_usage
        ctx["kms:CustomerMasterKeyUsage"] = key.key_usage
        ctx["kms:KeyOrigin"] = key.origin
        ctx["kms:KeyManager"] = "CUSTOMER"
        ctx["kms:MultiRegion"] = False
        for k, v in key.tags.items():
            ctx["aws:ResourceTag/" + k] = v
    return ctx


def _principal_type(arn: str) -> str:
    rest = arn.split(":", 5)[-1]
    return (
        "AssumedRole"
        if rest.startswith("assumed-role/")
        else ("Role" if rest.startswith("role/") else "User")
    )


def denied_message(principal_arn: str, action: str, resource: str | None, why: str) -> str:
    """AWS's AccessDeniedException message shape."""
    on = f" on resource: {resource}" if resource else ""
    return f"User: {principal_arn} is not authorized to perform: {action}{on} {why}"


def principal_of(arn: str, identity_policies: Iterable[Policy] = ()) -> Principal:
    account = account_of(arn) or ""
    return Principal(arn=arn, account=account, identity_policies=tuple(identity_policies))


def _identity(principal: Principal, request: AuthzRequest) -> tuple[bool, bool]:
    """(denied, allowed) by the principal's identity policies; root is allowed."""
    results: Sequence[Evaluation] = [evaluate(p, request) for p in principal.identity_policies]
    denied = any(e.denied for e in results)
    allowed = principal.root or any(e.allowed or e.account_allowed for e in results)
    return denied, allowed


def authorize_identity(
    principal: Principal, action: str, context: Mapping[str, object], resource: str = "*"
) -> None:
    """An action with no key policy (CreateKey, ListKeys, principal management).

    Raises AccessDeniedError unless the principal is its account's root or an identity
    policy allows the action and none denies it.
    """
    request = AuthzRequest(
        principal_arn=principal.arn,
        principal_account=principal.account,
        action=action,
        resource=resource,
        context=context,
    )
    denied, allowed = _identity(principal, request)
    if denied:
        raise AccessDeniedError(
            denied_message(
                principal.arn, action, resource if resource != "*" else None,
                "with an explicit deny in an identity-based policy",
            )
        )  # fmt: skip
    if not allowed:
        raise AccessDeniedError(
            denied_message(
                principal.arn, action, resource if resource != "*" else None,
                f"because no identity-based policy allows the {action} action",
            )
        )  # fmt: skip


def authorize_key(
    *,
    principal: Principal,
    action: str,
    operation: str,
    key_arn: str,
    key_policy: Policy,
    key_grants: Iterable[grants.GrantSpec],
    context: Mapping[str, object],
    encryption_context: Mapping[str, str] | None,
    grant_request: Mapping[str, Any] | None = None,
) -> None:
    """Decide a call on one key. Raises AccessDeniedError (AWS's message shape).

    ``grant_request`` is the recorded CreateGrant request (camelCase members): a grant
    that allows CreateGrant lets its grantee create only narrower grants.
    """
    request = AuthzRequest(
        principal_arn=principal.arn,
        principal_account=principal.account,
        action=action,
        resource=key_arn,
        context=context,
    )
    key_eval = evaluate(key_policy, request)
    if key_eval.denied:
        raise AccessDeniedError(
            denied_message(
                principal.arn, action, key_arn, "with an explicit deny in a resource-based policy"
            )
        )
    id_denied, id_allowed = _identity(principal, request)
    if id_denied:
        raise AccessDeniedError(
            denied_message(
                principal.arn, action, key_arn, "with an explicit deny in an identity-based policy"
            )
        )
    key_account = key_arn.split(":")[4] if key_arn.count(":") >= 5 else ""
    same_account = key_account == principal.account
    if key_eval.allowed and (same_account or id_allowed):
        return
    if key_eval.account_allowed and id_allowed:
        return
    grant_operation = action.removeprefix("kms:")
    for spec in key_grants:
        if grants.grant_allows(
            spec,
            operation=grant_operation,
            principal=principal.arn,
            encryption_context=encryption_context,
        ) and _within_parent_grant(spec, grant_operation, grant_request):
            return
    why = (
        f"because no identity-based policy allows the {action} action"
        if (key_eval.account_allowed or key_eval.allowed) and not id_allowed
        else f"because no resource-based policy allows the {action} action"
    )
    raise AccessDeniedError(denied_message(principal.arn, action, key_arn, why))


def _within_parent_grant(
    parent: grants.GrantSpec, operation: str, request: Mapping[str, Any] | None
) -> bool:
    """Whether a CreateGrant allowed by ``parent`` asks for no more than ``parent`` has.

    AWS KMS "Granting CreateGrant permission": the new grant may name only operations
    of the parent grant, and its encryption context constraint must be equally strict
    or stricter. Other operations are not limited here.
    """
    if operation != "CreateGrant":
        return True
    if request is None:
        return False  # fail closed: nothing to compare the new grant with
    operations = request.get("operations")
    if not isinstance(operations, list) or not set(operations) <= set(parent.operations):
        return False
    raw = request.get("constraints")
    child = (
        grants.Constraints.from_json({k[:1].upper() + k[1:]: v for k, v in raw.items()})
        if isinstance(raw, Mapping)
        else None
    )
    return grants.constraints_at_least_as_strict(parent.constraints, child)


def lockout_safe(policy: Policy, principal: Principal, key_arn: str) -> bool:
    """The policy lockout safety check: the principal making the request must be able
    to call PutKeyPolicy on the key under the new policy."""
    request = AuthzRequest(
        principal_arn=principal.arn,
        principal_account=principal.account,
        action="kms:PutKeyPolicy",
        resource=key_arn,
        context={"kms:CallerAccount": principal.account, "aws:PrincipalArn": principal.arn},
    )
    key_eval = evaluate(policy, request)
    if key_eval.denied:
        return False
    id_denied, id_allowed = _identity(principal, request)
    if id_denied:
        return False
    return key_eval.allowed or (key_eval.account_allowed and id_allowed)


def now_utc() -> datetime:
    return datetime.now(UTC)
