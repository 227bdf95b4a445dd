"""A pure evaluator for the IAM / KMS policy language: key policies and identity policies.

``parse_policy`` checks a JSON document once and compiles it into an immutable
``Policy``; ``evaluate`` answers, for one ``AuthzRequest``, whether some statement
denies, allows directly, or allows only through the caller's account. Combining that
answer with IAM policies and grants (the KMS authorization rules) is the caller's job.
No I/O, no clock: time-based conditions read ``aws:CurrentTime`` / ``aws:EpochTime``
from the request context like any other key.

Sources (IAM User Guide: "Policy elements", "Condition operators", "Single-valued vs.
multivalued context keys", "Policy variables", "NotPrincipal"; AWS KMS Developer Guide:
"AWS KMS condition keys"):

- Element names and Effect values are case sensitive; Action matching is case
  insensitive; Resource and principal ARN matching are case sensitive.
- Condition key names are case insensitive. KMS states that this includes the
  ``context-key`` part of ``kms:EncryptionContext:context-key`` ("A policy that uses this
  condition does not check the case of either element of the condition key"); a
  case-sensitive encryption context key is required through ``kms:EncryptionContextKeys``,
  whose values are compared by the operator.
- A key missing from the request context makes a positive operator false and a
  negated one (``StringNotEquals``, ``NotIpAddress``, ``ArnNotLike``, ...) true;
  ``...IfExists`` makes it true; ``ForAllValues`` is true and ``ForAnyValue`` false on a
  missing or empty set.
- ``NotPrincipal`` with ``Deny``: "you must also specify the account ARN of the
  not-excluded principal"; a caller escapes the statement only when both its own ARN
  and its account are listed.

Choices where AWS says nothing precise (each is tested):

- A negated operator is the negation of its positive twin over all request values: a
  plain ``StringNotEquals`` against a multivalued request key holds only if no request
  value equals any policy value. Positive operators hold if any request value matches
  any policy value. A request value that cannot be read as the operator's type (a
  non-IP ``aws:SourceIp``) matches nothing, so the negated operator holds; this is how
  a ``Deny`` + ``NotIpAddress`` statement catches calls that AWS services make for you.
- An empty list or ``None`` in the request context is the same as a missing key.
  Request keys that differ only in case are merged into one multivalued key.
- Date values are W3C/ISO 8601 text (``datetime.fromisoformat``; no zone means UTC)
  or epoch seconds; a string of digits, even ``"2020"``, is epoch seconds.
- Condition values that cannot be read as the operator's type (a bad date, number,
  CIDR, base64, Bool or Null value) make the document malformed, as do principal ARNs
  with wildcards, unknown elements, duplicate JSON object keys and empty value lists.
- Policy variables (``${aws:username}``, ``${aws:PrincipalArn}``, any context key, with
  an optional ``, 'default'``; ``${*}``, ``${?}``, ``${$}`` escapes) are resolved in
  Resource/NotResource and in String, Arn and Bool condition values, only when the
  document's Version is ``2012-10-17`` (as IAM does). A variable with no value and no
  default makes that one pattern match nothing.
- Principal ARNs are compared exactly: an assumed-role session ARN is not mapped back
  to its role ARN. ``Service``, ``Federated`` and ``CanonicalUser`` principals never
  match a caller.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from enum import Enum
from functools import cached_property
from typing import Literal, NoReturn, cast

from ledger.errors import MalformedPolicyDocumentError

__all__ = [
    "AuthzRequest",
    "Evaluation",
    "Policy",
    "Statement",
    "evaluate",
    "parse_policy",
    "policy_allows_put_key_policy",
]

VERSIONS = ("2012-10-17", "2008-10-17")
"""Accepted policy language versions; policy variables exist only in the first."""

_TOKEN_LIMIT = 64  # an error message quotes at most this much of an offending token

_ACCOUNT_RE = re.compile(r"[0-9]{12}")
_ROOT_RE = re.compile(r"arn:[a-z][a-z0-9-]*:iam::([0-9]{12}):root")
_PRINCIPAL_ARN_RE = re.compile(r"arn:[a-z][a-z0-9-]*:(?:iam|sts)::[0-9]{12}:[^\s*?]+")
_ACTION_RE = re.compile(r"\*|[A-Za-z0-9-]+:[A-Za-z0-9*?_.-]+")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_EPOCH_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_VARIABLE_RE = re.compile(r"\$\{([^}]*)\}")
_DEFAULT_RE = re.compile(r"([^\s,']+)\s*,\s*'([^']*)'")

_STATEMENT_KEYS = frozenset(
    {
        "Sid",
        "Effect",
        "Principal",
        "NotPrincipal",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
    }
)
_PRINCIPAL_TYPES = frozenset({"AWS", "Service", "Federated", "CanonicalUser"})


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class AuthzRequest:
    """One authorization question: may ``principal_arn`` do ``action`` on ``resource``?

    ``context`` maps condition keys (any case) to str, bool, int, float, datetime,
    bytes, or a list/tuple of those for multivalued keys.
    """

    principal_arn: str
    principal_account: str
    action: str
    resource: str
    context: Mapping[str, object] = field(default_factory=dict)

    @cached_property
    def normalised_context(self) -> dict[str, tuple[object, ...]]:
        """``context`` with lower-cased keys and tuple values, computed once for all the
        policies one decision evaluates (do not change ``context`` afterwards)."""
        return _normalise_context(self.context)


@dataclass(frozen=True)
class Evaluation:
    """What one policy says about one request.

    ``denied``: some Deny statement applies. ``allowed``: some Allow statement applies
    with the principal matched directly (its ARN, ``"*"``, a NotPrincipal that does not
    exclude it, or an identity policy). ``account_allowed``: some Allow statement applies
    only because it names the caller's account (its root ARN or bare account id).
    """

    denied: bool
    allowed: bool
    account_allowed: bool


class _Match(Enum):
    NONE = 0
    DIRECT = 1
    ACCOUNT = 2


@dataclass(frozen=True, slots=True)
class _Raw:
    """Policy text in which ``*`` and ``?`` are wildcards where the operator allows them."""

    text: str


@dataclass(frozen=True, slots=True)
class _Lit:
    """Text that is always literal: an escape such as ``${*}``."""

    text: str


@dataclass(frozen=True, slots=True)
class _Var:
    """A policy variable ``${name}`` or ``${name, 'default'}``; ``name`` is lower case."""

    name: str
    default: str | None


_Piece = _Raw | _Lit | _Var
_Resolver = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class _Text:
    """A policy string, split into pieces when it holds policy variables.

    ``static`` is the whole text and ``glob`` its compiled wildcard form when there is
    no variable (the common case), so evaluation does no parsing. ``glob`` carries the
    case rule it was compiled with.
    """

    source: str
    pieces: tuple[_Piece, ...]
    static: str | None
    glob: _Glob | None

    def render(self, resolve: _Resolver) -> list[tuple[str, bool]] | None:
        """(text, is_wildcard_capable) chunks, or None when a variable has no value."""
        out: list[tuple[str, bool]] = []
        for piece in self.pieces:
            if isinstance(piece, _Raw):
                out.append((piece.text, True))
            elif isinstance(piece, _Lit):
                out.append((piece.text, False))
            else:
                value = resolve(piece.name)
                if value is None:
                    value = piece.default
                if value is None:
                    return None
                out.append((value, False))
        return out

    def plain(self, resolve: _Resolver) -> str | None:
        """The text with variables substituted (wildcards kept as characters)."""
        if self.static is not None:
            return self.static
        chunks = self.render(resolve)
        return None if chunks is None else "".join(text for text, _ in chunks)

    def like(self, value: str, resolve: _Resolver, *, ignore_case: bool = False) -> bool:
        """Wildcard match of the whole ``value`` (``*`` any run, ``?`` one character)."""
        if self.glob is not None:
            return self.glob.matches(value)
        chunks = self.render(resolve)
        return chunks is not None and _Glob.build(chunks, ignore_case=ignore_case).matches(value)


@dataclass(frozen=True, slots=True)
class _Glob:
    """A ``*`` / ``?`` pattern matched in O(len(pattern) * len(value)), never worse.

    The pattern is cut at its ``*`` wildcards into fixed-length segments (``?`` is one
    character). The first segment must start the value and the last must end it; each
    middle segment is placed at its leftmost match after the previous one, which is
    optimal because segments have fixed lengths. A regex translation (``.*``) would
    backtrack polynomially in the number of stars, which a hostile policy could use.
    """

    segments: tuple[tuple[re.Pattern[str], int], ...]  # (segment regex, its length)
    starred: bool  # False: no ``*``, the single segment must be the whole value

    @classmethod
    def build(cls, chunks: Iterable[tuple[str, bool]], *, ignore_case: bool) -> _Glob:
        """Compile (text, wildcard_capable) chunks; ``*`` / ``?`` in the rest are literal."""
        flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
        segments: list[tuple[re.Pattern[str], int]] = []
        current: list[str] = []
        length = 0
        starred = False
        for text, wild in chunks:
            for char in text:
                if wild and char == "*":
                    segments.append((re.compile("".join(current), flags), length))
                    current, length, starred = [], 0, True
                else:
                    current.append("." if wild and char == "?" else re.escape(char))
                    length += 1
        segments.append((re.compile("".join(current), flags), length))
        return cls(tuple(segments), starred)

    def matches(self, value: str) -> bool:
        (first, first_len), *rest = self.segments
        if not self.starred:
            return len(value) == first_len and first.fullmatch(value) is not None
        last, last_len = rest[-1]
        end = len(value) - last_len
        if end < first_len or first.match(value, 0, first_len) is None:
            return False
        if last.fullmatch(value, end) is None:
            return False
        position = first_len
        for segment, _ in rest[:-1]:
            found = segment.search(value, position, end)
            if found is None:
                return False
            position = found.end()
        return True


@dataclass(frozen=True, slots=True)
class _Principals:
    """The principals a Principal / NotPrincipal element names."""

    wildcard: bool
    arns: frozenset[str]
    accounts: frozenset[str]  # from bare account ids and ``arn:...:iam::<acct>:root``
    others: frozenset[str]  # Service / Federated / CanonicalUser: never a caller here


@dataclass(frozen=True, slots=True)
class _Patterns:
    """The compiled Action/NotAction or Resource/NotResource element."""

    patterns: tuple[_Text, ...]
    negated: bool
    ignore_case: bool

    def matches(self, value: str, resolve: _Resolver) -> bool:
        hit = any(p.like(value, resolve, ignore_case=self.ignore_case) for p in self.patterns)
        return hit != self.negated


_Comparison = Literal["eq", "lt", "le", "gt", "ge"]


@dataclass(frozen=True, slots=True)
class _Condition:
    """One ``operator: {key: values}`` entry of a Condition block."""

    operator: str  # as written, e.g. "ForAnyValue:StringLikeIfExists"
    base: str  # e.g. "StringLike"
    qualifier: Literal["", "ForAnyValue", "ForAllValues"]
    if_exists: bool
    key: str  # lower case
    values: tuple[object, ...]  # compiled for the operator's family


@dataclass(frozen=True, slots=True)
class Statement:
    """One parsed statement. ``principals`` is None in identity policies."""

    sid: str | None
    effect: Literal["Allow", "Deny"]
    principals: _Principals | None
    not_principal: bool
    actions: _Patterns
    resources: _Patterns | None  # None: no Resource element, matches every resource
    conditions: tuple[_Condition, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed, immutable policy document; evaluate it with ``evaluate``.

    ``context_free``: no statement has a condition or a policy variable, so what the
    policy says depends only on the principal, action and resource; ``evaluate`` then
    keeps its answers in ``memo`` (at most ``_MEMO_SIZE``).
    """

    version: str
    id: str | None
    identity: bool
    statements: tuple[Statement, ...]
    context_free: bool = field(default=False, compare=False)
    memo: dict[tuple[str, str, str, str], Evaluation] = field(
        default_factory=dict, compare=False, repr=False
    )


def parse_policy(text: str, *, identity: bool = False) -> Policy:
    """Parse and check a policy document.

    Key policies (``identity=False``) need Principal or NotPrincipal in every
    statement; identity policies forbid both and need Resource or NotResource.

    Raises ``MalformedPolicyDocumentError`` for anything that is not a valid policy:
    bad JSON, duplicate object keys, unknown elements, a bad Version, Effect, Action,
    Resource or principal, an unknown condition operator, a condition value the
    operator cannot read, or a duplicate Sid. The message names at most the offending
    token.
    """
    if not isinstance(text, str):
        _malformed("The policy must be a JSON string.")
    try:
        doc: object = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as exc:
        _malformed(f"The policy has a duplicate key {_show(exc.key)}.")
    except (ValueError, RecursionError):
        _malformed("The policy is not valid JSON.")
    if not isinstance(doc, dict):
        _malformed("The policy must be a JSON object.")
    for key in doc:
        if key not in ("Version", "Id", "Statement"):
            _malformed(f"Unknown policy element {_show(key)}.")
    version = doc.get("Version", "2008-10-17")
    if not isinstance(version, str) or version not in VERSIONS:
        _malformed(f"Unsupported policy Version {_show(version)}.")
    policy_id = doc.get("Id")
    if policy_id is not None and not isinstance(policy_id, str):
        _malformed("The policy Id must be a string.")
    raw_statements = doc.get("Statement")
    if isinstance(raw_statements, dict):
        raw_statements = [raw_statements]
    if not isinstance(raw_statements, list) or not raw_statements:
        _malformed("The policy must contain a Statement object or a non-empty list.")
    variables = version == "2012-10-17"
    statements: list[Statement] = []
    sids: set[str] = set()
    for raw in raw_statements:
        statement = _parse_statement(raw, identity=identity, variables=variables)
        if statement.sid:
            if statement.sid in sids:
                _malformed(f"Duplicate statement Sid {_show(statement.sid)}.")
            sids.add(statement.sid)
        statements.append(statement)
    return Policy(
        version=version,
        id=policy_id,
        identity=identity,
        statements=tuple(statements),
        context_free=all(_context_free(st) for st in statements),
    )


def _context_free(statement: Statement) -> bool:
    """No condition and no policy variable: only principal, action, resource matter."""
    patterns = [statement.actions, *([statement.resources] if statement.resources else [])]
    return not statement.conditions and all(
        text.static is not None for p in patterns for text in p.patterns
    )


def evaluate(policy: Policy, request: AuthzRequest) -> Evaluation:
    """Which statements of ``policy`` apply to ``request``. Never raises for a parsed policy.

    A statement applies when its principal, action, resource and every condition
    match. See ``Evaluation`` for what each flag means. A context-free policy's answer
    is remembered per (principal, account, action, resource).
    """
    if not policy.context_free:
        return _evaluate(policy, request)
    key = (request.principal_arn, request.principal_account, request.action, request.resource)
    found = policy.memo.get(key)
    if found is None:
        found = _evaluate(policy, request)
        if len(policy.memo) >= _MEMO_SIZE:
            policy.memo.clear()
        policy.memo[key] = found
    return found


_MEMO_SIZE = 4096


def _evaluate(policy: Policy, request: AuthzRequest) -> Evaluation:
    # Without conditions or variables nothing reads the context: do not build it.
    context = {} if policy.context_free else request.normalised_context
    resolve = _resolver(context, request)
    is_root = _caller_is_root(request)
    denied = allowed = account_allowed = False
    for statement in policy.statements:
        match = _principal_match(statement, request, is_root=is_root)
        if match is _Match.NONE:
            continue
        if statement.effect == "Allow" and (allowed if match is _Match.DIRECT else account_allowed):
            continue  # this flag is already set; nothing new to learn
        if statement.effect == "Deny" and denied:
            continue
        if not statement.actions.matches(request.action, resolve):
            continue
        if statement.resources is not None and not statement.resources.matches(
            request.resource, resolve
        ):
            continue
        if not all(_condition_holds(c, context, resolve) for c in statement.conditions):
            continue
        if statement.effect == "Deny":
            denied = True
        elif match is _Match.DIRECT:
            allowed = True
        else:
            account_allowed = True
    return Evaluation(denied=denied, allowed=allowed, account_allowed=account_allowed)


def policy_allows_put_key_policy(
    policy: Policy, principal_arn: str, principal_account: str, key_arn: str
) -> bool:
    """The CreateKey / PutKeyPolicy lockout safety check.

    True when ``policy``, with an empty condition context, lets the principal call
    ``kms:PutKeyPolicy`` on ``key_arn`` directly or through its account's root, and no
    Deny statement applies. Never raises.
    """
    result = evaluate(
        policy,
        AuthzRequest(
            principal_arn=principal_arn,
            principal_account=principal_account,
            action="kms:PutKeyPolicy",
            resource=key_arn,
            context={},
        ),
    )
    return (result.allowed or result.account_allowed) and not result.denied


# --------------------------------------------------------------------------- parsing


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _show(token: object) -> str:
    """A short quotation of an offending token for an error message."""
    if not isinstance(token, str):
        if token is None:
            return "(missing)"
        if isinstance(token, bool):
            return "(a boolean)"
        return "(a number)" if isinstance(token, int | float) else "(a JSON structure)"
    text = token
    if len(text) > _TOKEN_LIMIT:
        text = text[: _TOKEN_LIMIT - 3] + "..."
    return repr(text)


def _malformed(message: str) -> NoReturn:
    raise MalformedPolicyDocumentError(message)


def _parse_statement(raw: object, *, identity: bool, variables: bool) -> Statement:
    if not isinstance(raw, dict):
        _malformed("Each policy statement must be a JSON object.")
    for key in raw:
        if key not in _STATEMENT_KEYS:
            _malformed(f"Unknown statement element {_show(key)}.")
    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        _malformed("A statement Sid must be a string.")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        _malformed(f"A statement Effect must be Allow or Deny, not {_show(effect)}.")

    has_principal = "Principal" in raw
    has_not_principal = "NotPrincipal" in raw
    principals: _Principals | None = None
    if identity:
        if has_principal or has_not_principal:
            _malformed("An identity policy statement cannot have Principal or NotPrincipal.")
    else:
        if has_principal == has_not_principal:
            _malformed("Each key policy statement needs exactly one of Principal, NotPrincipal.")
        element = "Principal" if has_principal else "NotPrincipal"
        principals = _parse_principals(raw[element], element)

    actions = _parse_patterns(raw, "Action", "NotAction", variables=False)
    if actions is None:
        _malformed("Each policy statement needs Action or NotAction.")
    resources = _parse_patterns(raw, "Resource", "NotResource", variables=variables)
    if resources is None and identity:
        _malformed("Each identity policy statement needs Resource or NotResource.")
    conditions = _parse_conditions(raw.get("Condition"), variables=variables)
    return Statement(
        sid=sid,
        effect="Allow" if effect == "Allow" else "Deny",
        principals=principals,
        not_principal=has_not_principal,
        actions=actions,
        resources=resources,
        conditions=conditions,
    )


def _string_list(value: object, element: str) -> list[str]:
    """A string or a non-empty list of strings."""
    items = value if isinstance(value, list) else [value]
    if not items:
        _malformed(f"{element} must not be an empty list.")
    for item in items:
        if not isinstance(item, str) or not item:
            _malformed(f"{element} values must be non-empty strings.")
    return [item for item in items if isinstance(item, str)]


def _parse_principals(value: object, element: str) -> _Principals:
    if value == "*":
        return _Principals(True, frozenset(), frozenset(), frozenset())
    if not isinstance(value, dict) or not value:
        _malformed(f'{element} must be "*" or an object such as {{"AWS": ...}}.')
    wildcard = False
    arns: set[str] = set()
    accounts: set[str] = set()
    others: set[str] = set()
    for kind, names in value.items():
        if kind not in _PRINCIPAL_TYPES:
            _malformed(f"Unknown principal type {_show(kind)}.")
        for name in _string_list(names, f"{element} {kind}"):
            if kind != "AWS":
                others.add(f"{kind}:{name}")
            elif name == "*":
                wildcard = True
            elif _ACCOUNT_RE.fullmatch(name):
                accounts.add(name)
            elif root := _ROOT_RE.fullmatch(name):
                accounts.add(root.group(1))
            elif _PRINCIPAL_ARN_RE.fullmatch(name):
                arns.add(name)
            else:
                _malformed(f"Invalid principal {_show(name)}.")
    return _Principals(wildcard, frozenset(arns), frozenset(accounts), frozenset(others))


def _parse_patterns(
    raw: dict[str, object], name: str, not_name: str, *, variables: bool
) -> _Patterns | None:
    """The compiled element, or None when the statement has neither form."""
    if name in raw and not_name in raw:
        _malformed(f"A statement cannot have both {name} and {not_name}.")
    if name not in raw and not_name not in raw:
        return None
    element = name if name in raw else not_name
    is_action = name == "Action"
    texts: list[_Text] = []
    for item in _string_list(raw[element], element):
        if is_action and not _ACTION_RE.fullmatch(item):
            _malformed(f"Invalid action {_show(item)}.")
        if not is_action and item != "*" and not item.startswith("arn:"):
            _malformed(f'A resource must be "*" or an ARN, not {_show(item)}.')
        texts.append(
            _compile_text(item, variables=variables, wildcards=True, ignore_case=is_action)
        )
    return _Patterns(tuple(texts), negated=element == not_name, ignore_case=is_action)


def _split_variables(text: str) -> tuple[_Piece, ...]:
    pieces: list[_Piece] = []
    position = 0
    for found in _VARIABLE_RE.finditer(text):
        if found.start() > position:
            pieces.append(_Raw(text[position : found.start()]))
        body = found.group(1).strip()
        with_default = _DEFAULT_RE.fullmatch(body)
        if body in ("*", "?", "$"):
            pieces.append(_Lit(body))
        elif with_default:
            pieces.append(_Var(with_default.group(1).lower(), with_default.group(2)))
        elif body and not any(c.isspace() or c in ",'" for c in body):
            pieces.append(_Var(body.lower(), None))
        else:
            pieces.append(_Raw(found.group(0)))  # not a variable: keep the text as written
        position = found.end()
    if position < len(text):
        pieces.append(_Raw(text[position:]))
    return tuple(pieces)


def _compile_text(text: str, *, variables: bool, wildcards: bool, ignore_case: bool) -> _Text:
    pieces: tuple[_Piece, ...] = (
        _split_variables(text) if variables and "${" in text else (_Raw(text),)
    )
    if any(isinstance(p, _Var) for p in pieces):
        return _Text(text, pieces, None, None)
    chunks = [(p.text, isinstance(p, _Raw)) for p in pieces if not isinstance(p, _Var)]
    static = "".join(t for t, _ in chunks)
    glob = _Glob.build(chunks, ignore_case=ignore_case) if wildcards else None
    return _Text(text, pieces, static, glob)


# Operator families. Each maps to how its policy values are compiled and compared.
_STRING, _STRING_CI, _LIKE, _NUMERIC, _DATE, _BOOL, _BINARY, _IP, _ARN, _NULL = range(10)

_OPERATORS: dict[str, tuple[int, _Comparison | None, bool]] = {
    # name: (family, comparison for numeric/date, negated)
    "StringEquals": (_STRING, None, False),
    "StringNotEquals": (_STRING, None, True),
    "StringEqualsIgnoreCase": (_STRING_CI, None, False),
    "StringNotEqualsIgnoreCase": (_STRING_CI, None, True),
    "StringLike": (_LIKE, None, False),
    "StringNotLike": (_LIKE, None, True),
    "NumericEquals": (_NUMERIC, "eq", False),
    "NumericNotEquals": (_NUMERIC, "eq", True),
    "NumericLessThan": (_NUMERIC, "lt", False),
    "NumericLessThanEquals": (_NUMERIC, "le", False),
    "NumericGreaterThan": (_NUMERIC, "gt", False),
    "NumericGreaterThanEquals": (_NUMERIC, "ge", False),
    "DateEquals": (_DATE, "eq", False),
    "DateNotEquals": (_DATE, "eq", True),
    "DateLessThan": (_DATE, "lt", False),
    "DateLessThanEquals": (_DATE, "le", False),
    "DateGreaterThan": (_DATE, "gt", False),
    "DateGreaterThanEquals": (_DATE, "ge", False),
    "Bool": (_BOOL, None, False),
    "BinaryEquals": (_BINARY, None, False),
    "IpAddress": (_IP, None, False),
    "NotIpAddress": (_IP, None, True),
    "ArnEquals": (_ARN, None, False),
    "ArnLike": (_ARN, None, False),
    "ArnNotEquals": (_ARN, None, True),
    "ArnNotLike": (_ARN, None, True),
    "Null": (_NULL, None, False),
}


def _parse_operator(name: str) -> tuple[str, Literal["", "ForAnyValue", "ForAllValues"], bool]:
    qualifier: Literal["", "ForAnyValue", "ForAllValues"] = ""
    rest = name
    if rest.startswith("ForAnyValue:"):
        qualifier, rest = "ForAnyValue", rest[len("ForAnyValue:") :]
    elif rest.startswith("ForAllValues:"):
        qualifier, rest = "ForAllValues", rest[len("ForAllValues:") :]
    if_exists = rest.endswith("IfExists")
    base = rest[: -len("IfExists")] if if_exists else rest
    if base not in _OPERATORS or (base == "Null" and (qualifier or if_exists)):
        _malformed(f"Unknown condition operator {_show(name)}.")
    return base, qualifier, if_exists


def _parse_conditions(block: object, *, variables: bool) -> tuple[_Condition, ...]:
    if block is None:
        return ()
    if not isinstance(block, dict):
        _malformed("Condition must be an object of {operator: {key: values}}.")
    out: list[_Condition] = []
    for op_name, entries in block.items():
        base, qualifier, if_exists = _parse_operator(op_name)
        if not isinstance(entries, dict):
            _malformed(f"Condition operator {_show(op_name)} needs an object of keys.")
        for key, raw_values in entries.items():
            if not key:
                _malformed("A condition key must not be empty.")
            values = tuple(
                _compile_value(base, value, variables=variables)
                for value in _condition_values(raw_values, key)
            )
            out.append(_Condition(op_name, base, qualifier, if_exists, key.lower(), values))
    return tuple(out)


def _condition_values(raw: object, key: str) -> list[str]:
    """Policy values as strings, converting JSON numbers and booleans as IAM does."""
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        _malformed(f"Condition key {_show(key)} has an empty list of values.")
    out: list[str] = []
    for item in items:
        if isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, int | float | str):
            out.append(str(item))
        else:
            _malformed(f"Condition key {_show(key)} values must be strings, numbers or booleans.")
    return out


def _compile_value(base: str, value: str, *, variables: bool) -> object:
    family = _OPERATORS[base][0]
    if family in (_STRING, _STRING_CI, _BOOL):
        if family == _BOOL and "${" not in value and value.lower() not in ("true", "false"):
            _malformed(f"Bool needs true or false, not {_show(value)}.")
        return _compile_text(value, variables=variables, wildcards=False, ignore_case=False)
    if family in (_LIKE, _ARN):
        return _compile_text(value, variables=variables, wildcards=True, ignore_case=False)
    if family == _NULL:
        if value.lower() not in ("true", "false"):
            _malformed(f"Null needs true or false, not {_show(value)}.")
        return value.lower() == "true"
    parsed: object | None
    if family == _NUMERIC:
        parsed = _as_number(value)
    elif family == _DATE:
        parsed = _as_datetime(value)
    elif family == _BINARY:
        parsed = _as_binary(value)
    else:
        try:
            parsed = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            parsed = None
    if parsed is None:
        _malformed(f"{base} cannot use the value {_show(value)}.")
    return parsed


# --------------------------------------------------------------------------- values


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _as_number(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, int):
        return Decimal(value)
    elif isinstance(value, float):
        number = Decimal(repr(value))
    elif isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:  # pragma: no cover - the regex admits only numbers
            return None
    else:
        return None
    return number if number.is_finite() else None


def _as_datetime(value: object) -> datetime | None:
    """An aware datetime from ISO 8601 text, epoch seconds, or a datetime/date."""
    if isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _EPOCH_RE.fullmatch(text):
            seconds = float(text)
        else:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                return None
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _as_binary(value: object) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _as_ip(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if not isinstance(value, str):
        return None
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        return None


# --------------------------------------------------------------------------- evaluation


def _normalise_context(context: Mapping[str, object]) -> dict[str, tuple[object, ...]]:
    """Lower-case keys; every value as a non-empty tuple; empty and None values dropped."""
    out: dict[str, list[object]] = {}
    for key, value in context.items():
        if value is None:
            continue
        if isinstance(value, list | tuple | set | frozenset):
            present = [item for item in value if item is not None]
            if not present:
                continue
        else:
            present = [value]
        name = (key if type(key) is str else str(key)).lower()
        found = out.get(name)
        if found is None:
            out[name] = present
        else:
            found.extend(present)
    return {key: tuple(values) for key, values in out.items()}


def _resolver(context: Mapping[str, tuple[object, ...]], request: AuthzRequest) -> _Resolver:
    """Look up policy variables: context keys first, then facts of the request."""

    def resolve(name: str) -> str | None:
        values = context.get(name)
        if values is not None:
            return _as_text(values[0]) if len(values) == 1 else None
        if name == "aws:principalarn":
            return request.principal_arn
        if name == "aws:principalaccount":
            return request.principal_account
        if name == "aws:username" and ":user/" in request.principal_arn:
            return request.principal_arn.rsplit("/", 1)[-1]
        return None

    return resolve


def _caller_is_root(request: AuthzRequest) -> bool:
    root = _ROOT_RE.fullmatch(request.principal_arn)
    return root is not None and root.group(1) == request.principal_account


def _principal_match(statement: Statement, request: AuthzRequest, *, is_root: bool) -> _Match:
    principals = statement.principals
    if principals is None:
        return _Match.DIRECT  # identity policy: applies to the identity it is attached to
    account_listed = principals.wildcard or request.principal_account in principals.accounts
    own_listed = principals.wildcard or request.principal_arn in principals.arns
    if is_root:
        own_listed = own_listed or account_listed
    if statement.not_principal:
        # A Deny escapes the caller only if every identity it has is listed (IAM docs);
        # an Allow skips the caller if any of them is listed (the cautious reading).
        if statement.effect == "Deny":
            excluded = own_listed and account_listed
        else:
            excluded = own_listed or account_listed
        return _Match.NONE if excluded else _Match.DIRECT
    if own_listed:
        return _Match.DIRECT
    if account_listed:
        return _Match.ACCOUNT
    return _Match.NONE


def _condition_holds(
    condition: _Condition, context: Mapping[str, tuple[object, ...]], resolve: _Resolver
) -> bool:
    values = context.get(condition.key)
    family, comparison, negated = _OPERATORS[condition.base]
    if family == _NULL:
        return any(bool(v) == (values is None) for v in condition.values)
    if values is None:
        if condition.if_exists or condition.qualifier == "ForAllValues":
            return True
        if condition.qualifier == "ForAnyValue":
            return False
        return negated

    def satisfies(value: object) -> bool:
        hit = any(_matches_one(family, comparison, value, p, resolve) for p in condition.values)
        return hit != negated

    if condition.qualifier == "ForAnyValue":
        return any(satisfies(v) for v in values)
    if condition.qualifier == "ForAllValues":
        return all(satisfies(v) for v in values)
    hit = any(
        _matches_one(family, comparison, v, p, resolve) for v in values for p in condition.values
    )
    return hit != negated


def _matches_one(
    family: int,
    comparison: _Comparison | None,
    value: object,
    policy_value: object,
    resolve: _Resolver,
) -> bool:
    """Does one request value match one policy value under the positive operator?"""
    if family in (_STRING, _STRING_CI, _BOOL, _LIKE, _ARN):
        pattern = cast(_Text, policy_value)
        text = _as_text(value)
        if family == _LIKE:
            return pattern.like(text, resolve)
        if family == _ARN:
            return _arn_like(pattern, text, resolve)
        expected = pattern.plain(resolve)
        if expected is None:
            return False
        if family == _STRING:
            return text == expected
        return text.lower() == expected.lower()
    if family in (_NUMERIC, _DATE):
        actual = _as_number(value) if family == _NUMERIC else _as_datetime(value)
        return comparison is not None and _compare(actual, policy_value, comparison)
    if family == _BINARY:
        return _as_binary(value) == policy_value
    network = cast(ipaddress.IPv4Network | ipaddress.IPv6Network, policy_value)
    address = _as_ip(value)
    return address is not None and address in network


def _compare(actual: object, expected: object, comparison: _Comparison) -> bool:
    """Order two numbers (Decimal) or two instants (aware datetime); False otherwise."""
    if isinstance(actual, Decimal) and isinstance(expected, Decimal):
        return _by_sign((actual > expected) - (actual < expected), comparison)
    if isinstance(actual, datetime) and isinstance(expected, datetime):
        return _by_sign((actual > expected) - (actual < expected), comparison)
    return False


def _by_sign(sign: int, comparison: _Comparison) -> bool:
    if comparison == "eq":
        return sign == 0
    if comparison == "lt":
        return sign < 0
    if comparison == "le":
        return sign <= 0
    if comparison == "gt":
        return sign > 0
    return sign >= 0


def _arn_like(pattern: _Text, value: str, resolve: _Resolver) -> bool:
    """IAM ARN matching: each of the six colon-separated parts matched on its own.

    The sixth part (the resource) may itself hold colons. A lone ``*`` matches any
    value; a pattern that is not a six-part ARN matches nothing.
    """
    chunks = pattern.render(resolve)
    if chunks is None:
        return False
    if chunks == [("*", True)]:
        return True
    # Split the rendered pattern at its first five colons, keeping wildcard flags.
    parts: list[list[tuple[str, bool]]] = [[]]
    for text, wild in chunks:
        start = 0
        for index, char in enumerate(text):
            if char == ":" and len(parts) < 6:
                parts[-1].append((text[start:index], wild))
                parts.append([])
                start = index + 1
        parts[-1].append((text[start:], wild))
    targets = value.split(":", 5)
    if len(parts) != 6 or len(targets) != 6:
        return False
    return all(
        _Glob.build(part, ignore_case=False).matches(target)
        for part, target in zip(parts, targets, strict=True)
    )
