"""AWS JSON 1.1 for the KMS API, driven by botocore's KMS service model.

Pure: the only I/O is loading the model once (``botocore/data/kms/2014-11-01``).

Requests are validated like AWS's front end does before an operation runs:
type errors are ``SerializationException`` (first one wins, as a JSON parser would
stop), constraint errors (required, length, range, enum, pattern) are collected into
one ``ValidationException`` whose message follows AWS's wording
(``N validation errors detected: Value ... at 'keyId' failed to satisfy constraint:
...``, lowerCamelCase paths, 1-based list indexes as ``tags.1.member.tagKey``).
Unlike AWS, members that are not in the operation's input shape are rejected
(``SerializationException``), by the product owner's choice; so a client whose
botocore knows newer members gets an explicit error rather than silent ignoring.

Security: values of blobs and of members the model marks ``sensitive`` are never
echoed in error messages (messages are stored in the audit log); string values are
echoed only for enum, pattern and range errors, truncated.
"""

from __future__ import annotations

import base64
import binascii
import functools
import inspect
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from botocore import xform_name
from botocore.loaders import Loader

from ledger.errors import (
    KeyLedgerError,
    SerializationError,
    UnknownOperationError,
    UnsupportedOperationError,
    ValidationError,
)

if TYPE_CHECKING:
    from ledger.service import Caller

JSON = dict[str, Any]
CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "TrentService."
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_SHOWN_VALUE_MAX = 256
_NULL = "\0null"  # marker: AWS writes ``Value null at ...`` without quotes


class DependencyTimeoutError(KeyLedgerError):
    """The operation did not finish within the request timeout (it may still finish)."""

    aws_name = "DependencyTimeoutException"


# --------------------------------------------------------------------------- model


@functools.cache
def _model() -> JSON:
    model: JSON = Loader().load_service_model("kms", "service-2")
    return model


def _shapes() -> JSON:
    shapes: JSON = _model()["shapes"]
    return shapes


@functools.cache
def model_operations() -> frozenset[str]:
    """Every operation in the KMS model (implemented or not)."""
    return frozenset(_model()["operations"])


def _input_shape(operation: str) -> str | None:
    op = _model()["operations"].get(operation)
    if op is None:
        raise UnknownOperationError(f"Unknown operation {operation[:128]!r}.")
    inp = op.get("input")
    return None if inp is None else str(inp["shape"])


def _output_shape(operation: str) -> str | None:
    out = _model()["operations"][operation].get("output")
    return None if out is None else str(out["shape"])


def _camel(name: str) -> str:
    """AWS's member path spelling: ``KeyId`` -> ``keyId``."""
    return name[:1].lower() + name[1:]


@functools.cache
def _pattern(shape_name: str) -> re.Pattern[str] | None:
    pattern = _shapes()[shape_name].get("pattern")
    # AWS's patterns are Java regexes with ASCII \w, \s; they compile the same here.
    return None if pattern is None else re.compile(pattern, re.ASCII)


# --------------------------------------------------------------------------- parse


def parse_request(operation: str, body: bytes) -> JSON:
    """Decode and validate a JSON 1.1 request body against the operation's input shape.

    Returns the members under their AWS (PascalCase) names with blobs decoded to bytes
    and timestamps as aware UTC datetimes; JSON ``null`` members count as absent.
    Raises UnknownOperationError, SerializationError (malformed JSON, wrong types,
    bad base64, unknown members), ValidationError (all constraint violations).
    """
    shape_name = _input_shape(operation)
    if body.strip() == b"":
        raw: Any = {}
    else:
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise SerializationError("The request body is not valid JSON.") from None
    if shape_name is None:
        if raw != {}:
            raise SerializationError(f"{operation} takes no request members.")
        return {}
    problems: list[str] = []
    parsed = _parse_value(raw, shape_name, "", problems)
    if problems:
        raise _validation(problems)
    result: JSON = parsed
    return result


def _validation(problems: list[str]) -> ValidationError:
    count = len(problems)
    noun = "error" if count == 1 else "errors"
    return ValidationError(f"{count} validation {noun} detected: " + "; ".join(problems))


def _token(value: Any) -> str:
    """The JSON token name AWS's parser reports for an unexpected value."""
    if isinstance(value, bool):
        return "TRUE_VALUE" if value else "FALSE_VALUE"
    if isinstance(value, str):
        return "STRING_VALUE"
    if isinstance(value, int | float):
        return "NUMBER_VALUE"
    return "VALUE"


def _mismatch(value: Any, target: str) -> SerializationError:
    if isinstance(value, dict):
        return SerializationError("Start of structure or map found where not expected.")
    if isinstance(value, list):
        return SerializationError("Start of list found where not expected.")
    article = "an" if target[:1] in "AEIOU" else "a"
    return SerializationError(f"{_token(value)} can not be converted to {article} {target}")


def _constraint(problems: list[str], path: str, constraint: str, shown: str | None) -> None:
    value = "" if shown is None else " null" if shown is _NULL else f" '{shown}'"
    problems.append(f"Value{value} at '{path}' failed to satisfy constraint: {constraint}")


def _show(value: Any, shape: JSON) -> str | None:
    if shape.get("sensitive"):
        return None
    text = str(value)
    return text if len(text) <= _SHOWN_VALUE_MAX else text[:_SHOWN_VALUE_MAX] + "..."


def _check_length(
    problems: list[str], path: str, shape: JSON, length: int, show: str | None = None
) -> None:
    if "min" in shape and length < shape["min"]:
        _constraint(
            problems, path, f"Member must have length greater than or equal to {shape['min']}", show
        )
    if "max" in shape and length > shape["max"]:
        _constraint(
            problems, path, f"Member must have length less than or equal to {shape['max']}", show
        )


def _parse_value(value: Any, shape_name: str, path: str, problems: list[str]) -> Any:
    shape = _shapes()[shape_name]
    kind = shape["type"]
    if kind == "structure":
        return _parse_structure(value, shape_name, shape, path, problems)
    if kind == "list":
        if not isinstance(value, list):
            raise _mismatch(value, "List")
        _check_length(problems, path, shape, len(value))
        member = shape["member"]["shape"]
        return [
            _parse_value(item, member, f"{path}.{i}.member", problems)
            for i, item in enumerate(value, start=1)
            if item is not None
        ]
    if kind == "map":
        if not isinstance(value, dict):
            raise _mismatch(value, "Map")
        _check_length(problems, path, shape, len(value))
        out: JSON = {}
        for k, v in value.items():
            key = _parse_value(k, shape["key"]["shape"], f"{path}.key", problems)
            if v is None:
                raise SerializationError(f"Null value in map '{path}'.")
            out[key] = _parse_value(v, shape["value"]["shape"], f"{path}.{k}", problems)
        return out
    if kind == "string":
        if not isinstance(value, str):
            raise _mismatch(value, "String")
        if "enum" in shape and value not in shape["enum"]:
            allowed = ", ".join(shape["enum"])
            _constraint(
                problems,
                path,
                f"Member must satisfy enum value set: [{allowed}]",
                _show(value, shape),
            )
            return value
        _check_length(problems, path, shape, len(value))
        pattern = _pattern(shape_name)
        if pattern is not None and value and pattern.fullmatch(value) is None:
            _constraint(
                problems,
                path,
                f"Member must satisfy regular expression pattern: {shape['pattern']}",
                _show(value, shape),
            )
        return value
    if kind == "blob":
        if not isinstance(value, str):
            raise _mismatch(value, "Blob")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise SerializationError(f"Invalid base64 value at '{path}'.") from None
        _check_length(problems, path, shape, len(data))
        return data
    if kind in ("integer", "long"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _mismatch(value, "Integer" if kind == "integer" else "Long")
        low, high = _INT32 if kind == "integer" else _INT64
        if not low <= value <= high:
            raise SerializationError(f"NUMBER_VALUE at '{path}' is out of range.")
        if "min" in shape and value < shape["min"]:
            constraint = f"Member must have value greater than or equal to {shape['min']}"
            _constraint(problems, path, constraint, str(value))
        if "max" in shape and value > shape["max"]:
            constraint = f"Member must have value less than or equal to {shape['max']}"
            _constraint(problems, path, constraint, str(value))
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _mismatch(value, "Boolean")
        return value
    if kind == "timestamp":
        return _parse_timestamp(value, path)
    raise SerializationError(f"Unsupported member type at '{path}'.")  # not in the KMS model


def _parse_structure(
    value: Any, shape_name: str, shape: JSON, path: str, problems: list[str]
) -> JSON:
    if not isinstance(value, dict):
        if isinstance(value, list):
            raise SerializationError("Start of list found where not expected.")
        raise SerializationError(f"{_token(value)} can not be converted to a Structure")
    members: JSON = shape.get("members", {})
    unknown = [k for k in value if k not in members]
    if unknown:
        name = unknown[0][:128]
        raise SerializationError(f"'{name}' is not a member of {shape_name}.")
    out: JSON = {}
    prefix = f"{path}." if path else ""
    for name in members:
        item = value.get(name)
        if item is not None:
            out[name] = _parse_value(item, members[name]["shape"], prefix + _camel(name), problems)
    for name in shape.get("required", ()):
        if name not in out:
            _constraint(problems, prefix + _camel(name), "Member must not be null", _NULL)
    return out


def _parse_timestamp(value: Any, path: str) -> datetime:
    if isinstance(value, bool):
        raise _mismatch(value, "Date")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise SerializationError(f"Invalid timestamp at '{path}'.")
        try:
            return datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise SerializationError(f"Invalid timestamp at '{path}'.") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise SerializationError(f"Invalid timestamp at '{path}'.") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise _mismatch(value, "Date")


# --------------------------------------------------------------------------- call

#: AWS member -> KeyLedger keyword, where xform_name's snake_case is not the name.
RENAMED: dict[tuple[str, str], str] = {
    # Deprecated alias of KeySpec; passed as key_spec when KeySpec is absent.
    ("CreateKey", "CustomerMasterKeySpec"): "key_spec",
}


#: Members KeyLedger has no parameter for, and the values it accepts and ignores.
#: ``GrantTokens``: every grant is effective as soon as CreateGrant's event commits
#: (the ledger is strongly consistent), so tokens add nothing; they are
#: shape-validated and otherwise ignored (never parsed, never recorded).
def _grant_tokens_valid(value: Any, params: JSON) -> bool:
    """Grant tokens need no waiting here (grants apply as soon as they are recorded),
    but each must be a token KeyLedger issued. Raises InvalidGrantTokenError."""
    from ledger.domain.grants import parse_grant_token

    for token in value or ():
        parse_grant_token(token)
    return True


IGNORED: dict[str, Callable[[Any, JSON], bool]] = {
    "GrantTokens": _grant_tokens_valid,
    "DryRun": lambda value, params: True,  # True: see prepare_call
    "DryRunModifiers": lambda value, params: True,
    "MultiRegion": lambda value, params: value is False,
    "IncludeKeyMaterial": lambda value, params: value == "ROTATIONS_ONLY",
}


def implemented_operations(ledger: Any = None) -> frozenset[str]:
    """Model operations that ``ledger`` (default: the KeyLedger class) implements."""
    if ledger is None:
        from ledger.service import KeyLedger

        ledger = KeyLedger
    return frozenset(
        op for op in model_operations() if callable(getattr(ledger, xform_name(op), None))
    )


def _keywords(method: Callable[..., Any]) -> tuple[frozenset[str], frozenset[str]]:
    """The keywords ``method`` accepts, and those of them without a default."""
    return _function_keywords(getattr(method, "__func__", method))


@functools.lru_cache(maxsize=512)
def _function_keywords(method: Callable[..., Any]) -> tuple[frozenset[str], frozenset[str]]:
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):  # pragma: no cover - builtins only
        return frozenset(), frozenset()
    params = [
        p
        for name, p in signature.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in ("caller", "self")
    ]
    return (
        frozenset(p.name for p in params),
        frozenset(p.name for p in params if p.default is p.empty),
    )


def prepare_call(ledger: Any, operation: str, params: JSON) -> tuple[Callable[..., JSON], JSON]:
    """The KeyLedger method for ``operation`` and its keyword arguments.

    Raises (before anything runs, so the caller records the rejection):
    UnknownOperationError for names outside the model; UnsupportedOperationError for
    model operations KeyLedger lacks (``"<Op> is not supported by KeyLedger."``), for
    any member the method cannot take
    (``"The <Member> parameter is not supported by KeyLedger."``); ValidationError
    when a member the method requires is absent (AWS's "Member must not be null").
    With ``DryRun`` true the method returned runs every check and then raises
    DryRunOperationError instead of recording a success.
    """
    _input_shape(operation)  # UnknownOperationError
    method = getattr(ledger, xform_name(operation), None)
    if not callable(method):
        raise UnsupportedOperationError(f"{operation} is not supported by KeyLedger.")
    accepted, needed = _keywords(method)
    kwargs: JSON = {}
    dry = params.get("DryRun") is True
    for name, value in params.items():
        keyword = _keyword(operation, name)
        if keyword in accepted:
            if keyword in kwargs and kwargs[keyword] != value:
                others = [n for n in params if n != name and _keyword(operation, n) == keyword]
                raise ValidationError(
                    f"You cannot specify {others[0]} and {name} in the same request."
                )
            kwargs[keyword] = value
            continue
        ignore = IGNORED.get(name)
        if ignore is not None and ignore(value, params):
            continue
        raise UnsupportedOperationError(f"The {name} parameter is not supported by KeyLedger.")
    missing = sorted(needed - kwargs.keys())
    if missing:
        # Optional in the model but required here (e.g. CreateGrant's GranteePrincipal,
        # which only GranteeServicePrincipal may replace): AWS's "must not be null".
        shape_name = _input_shape(operation)
        members = _shapes()[shape_name].get("members", {}) if shape_name else {}
        names = {_keyword(operation, m): m for m in members}
        problems: list[str] = []
        for keyword in missing:
            path = _camel(names.get(keyword, keyword))
            _constraint(problems, path, "Member must not be null", _NULL)
        raise _validation(problems)
    if dry:
        return functools.partial(_dry_run, method), kwargs
    return method, kwargs


def _dry_run(method: Callable[..., JSON], **kwargs: Any) -> JSON:
    """Run every check of ``method`` and answer DryRunOperationException when it would
    have succeeded (ledger.service.dry_run)."""
    from ledger.service import dry_run

    with dry_run():
        return method(**kwargs)


def _keyword(operation: str, member: str) -> str:
    snake: str = xform_name(member)
    return RENAMED.get((operation, member), snake)


def call_operation(ledger: Any, caller: Caller, operation: str, params: JSON) -> JSON:
    """Run ``operation`` on ``ledger`` with parsed ``params`` (see ``prepare_call``)."""
    method, kwargs = prepare_call(ledger, operation, params)
    result: JSON = method(caller=caller, **kwargs)
    return result


# --------------------------------------------------------------------------- serialize


def serialize_response(operation: str, result: Mapping[str, Any]) -> bytes:
    """The JSON 1.1 body of a successful ``operation``: only output-shape members,
    blobs base64, timestamps epoch seconds, ``None`` members omitted.

    Raises TypeError when a value does not fit its shape (a bug: answer 500).
    """
    shape_name = _output_shape(operation)
    if shape_name is None:
        return b"{}"
    return orjson.dumps(_serialize_value(result, shape_name))


def _serialize_value(value: Any, shape_name: str) -> Any:
    shape = _shapes()[shape_name]
    kind = shape["type"]
    if kind == "structure":
        if not isinstance(value, Mapping):
            raise TypeError(f"{shape_name} must be a mapping")
        members: JSON = shape.get("members", {})
        return {
            name: _serialize_value(value[name], members[name]["shape"])
            for name in members
            if value.get(name) is not None
        }
    if kind == "list":
        return [_serialize_value(v, shape["member"]["shape"]) for v in value]
    if kind == "map":
        return {str(k): _serialize_value(v, shape["value"]["shape"]) for k, v in value.items()}
    if kind == "blob":
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{shape_name} must be bytes")
        return base64.b64encode(bytes(value)).decode("ascii")
    if kind == "timestamp":
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            return value.timestamp()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        raise TypeError(f"{shape_name} must be a datetime or epoch seconds")
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{shape_name} must be an integer")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise TypeError(f"{shape_name} must be a boolean")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{shape_name} must be a string")
    return value


# --------------------------------------------------------------------------- errors

#: AWS names answered with a 5xx status; every other error is a client error (400).
#: AWS KMS (a JSON 1.1 "Coral" service) answers 400 for its authentication errors too
#: (MissingAuthenticationToken, UnrecognizedClient, InvalidSignature,
#: IncompleteSignature, AccessDenied), unlike query-protocol services such as STS.
SERVER_ERRORS: dict[str, int] = {
    "KMSInternalException": 500,
    "DependencyTimeoutException": 503,
    "KeyUnavailableException": 500,
}

INTERNAL_MESSAGE = "An internal error occurred."


def error_status(err: KeyLedgerError) -> int:
    return SERVER_ERRORS.get(err.aws_name, 400)


def error_body(err: KeyLedgerError) -> tuple[int, bytes]:
    """The HTTP status and JSON 1.1 body ``{"__type": ..., "message": ...}`` for ``err``.

    Internal errors (LedgerUnavailableError, HsmError, ...) keep their message, which
    the service writes for callers; unexpected exceptions never reach here.
    """
    status = error_status(err)
    message = err.message or (INTERNAL_MESSAGE if status >= 500 else "")
    return status, orjson.dumps({"__type": err.aws_name, "message": message})


__all__ = [
    "CONTENT_TYPE",
    "INTERNAL_MESSAGE",
    "TARGET_PREFIX",
    "DependencyTimeoutError",
    "call_operation",
    "error_body",
    "error_status",
    "implemented_operations",
    "model_operations",
    "parse_request",
    "prepare_call",
    "serialize_response",
]
