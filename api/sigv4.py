"""AWS Signature Version 4 verification, server side.

Three steps, so the caller can look up the secret between them:

1. :func:`parse_and_canonicalise` reads the ``Authorization`` header (or the presigned
   ``X-Amz-*`` query parameters), checks the date window and the credential scope, and
   rebuilds the string to sign exactly as botocore's ``SigV4Auth`` does.
2. The caller finds the secret for ``ParsedAuth.access_key_id`` (unknown key:
   ``UnrecognizedClientError``) and derives the key with :func:`signing_key`.
3. :func:`verify_signature` compares in constant time, then :class:`ReplayCache` refuses a
   signature it has already accepted.

Error messages follow AWS's wording. They never contain a secret, a signing key or the
signature the client sent; parts of the client's ``Authorization`` header are echoed only
clipped.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import quote, unquote_plus

from ledger.errors import (
    IncompleteSignatureError,
    InvalidSignatureError,
    MissingAuthenticationTokenError,
)

ALGORITHM = "AWS4-HMAC-SHA256"
TERMINATOR = "aws4_request"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
MAX_PRESIGNED_EXPIRES = timedelta(days=7)

MISSING_AUTHENTICATION_MESSAGE = "Request is missing Authentication Token"
SIGNATURE_MISMATCH_MESSAGE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)
REPLAYED_MESSAGE = "Signature has already been used."
CONTENT_SHA256_MISMATCH_MESSAGE = (
    "The provided 'x-amz-content-sha256' header does not match what was computed."
)
CONTENT_SHA256_INVALID_MESSAGE = (
    "The provided 'x-amz-content-sha256' header must be UNSIGNED-PAYLOAD or a valid sha256 value."
)
HOST_NOT_SIGNED_MESSAGE = (
    "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization."
)

_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_AMZ_DATE_SHAPE = re.compile(r"\d{8}T\d{6}Z", re.ASCII)
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_QUERY_AUTH_PARAMS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature")
_QUERY_REQUIRED = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Signature",
    "X-Amz-SignedHeaders",
    "X-Amz-Date",
)
_UNRESERVED = "-_.~"
_ECHO_LIMIT = 40


@dataclass(frozen=True)
class ParsedAuth:
    """A SigV4-signed request, parsed and canonicalised, not yet verified.

    ``signature`` and ``session_token`` are left out of ``repr`` so that logging this
    object does not log them.
    """

    access_key_id: str
    date: str  # scope date YYYYMMDD
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str = field(repr=False)  # hex as sent
    amz_date: datetime  # request time, tz-aware UTC
    string_to_sign: str
    session_token: str | None = field(repr=False)
    # Last instant the signature is accepted (amz_date + skew, or + X-Amz-Expires).
    valid_until: datetime | None = None
    presigned: bool = False


def signing_key(secret_access_key: str, date: str, region: str, service: str) -> bytes:
    """Derive the SigV4 signing key (``kSigning``) for one scope.

    The result is as secret as the secret access key: never log it or put it in a message.
    """
    key = _hmac(f"AWS4{secret_access_key}".encode(), date)
    for part in (region, service, TERMINATOR):
        key = _hmac(key, part)
    return key


def verify_signature(parsed: ParsedAuth, key: bytes) -> None:
    """Check the request's signature against ``key`` (from :func:`signing_key`).

    Compares in constant time. Raises ``InvalidSignatureError`` with AWS's message when
    the signature does not match; returns ``None`` otherwise.
    """
    expected = hmac.new(key, parsed.string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode("ascii"), parsed.signature.encode("utf-8")):
        raise InvalidSignatureError(SIGNATURE_MISMATCH_MESSAGE)


def parse_and_canonicalise(
    *,
    method: str,
    path: str,
    query_string: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    now: datetime,
    expected_service: str | None,
    allowed_regions: Collection[str] | None = None,
    max_skew: timedelta = timedelta(minutes=5),
) -> ParsedAuth:
    """Parse a request's SigV4 authentication and build its string to sign.

    ``path`` and ``query_string`` must be exactly as sent on the wire, still
    percent-encoded (ASGI ``raw_path`` and ``query_string``), because the canonical URI
    encodes the wire path once more, as botocore does. ``headers`` are the raw
    ``(name, value)`` pairs, any case, repeats allowed; the ``Host`` value is used as
    received. ``now`` must be timezone-aware.

    Header auth (``Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=...,
    Signature=...``) must fall within ``now`` +/- ``max_skew``. Presigned auth
    (``X-Amz-Algorithm``, ``X-Amz-Credential``, ``X-Amz-Date``, ``X-Amz-SignedHeaders``,
    ``X-Amz-Signature``, optional ``X-Amz-Expires`` up to a week) is accepted from
    ``X-Amz-Date - max_skew`` until ``X-Amz-Date + X-Amz-Expires``.

    The payload hash is ``x-amz-content-sha256`` when present, else the body's SHA-256.
    With ``UNSIGNED-PAYLOAD`` the body is not covered by the signature at all.

    Raises:
        MissingAuthenticationTokenError: no ``Authorization`` header and no presigned
            query parameters.
        IncompleteSignatureError: a malformed ``Authorization`` header or presigned query
            (missing ``Credential``, ``Signature``, ``SignedHeaders``, date; bad date
            format; a credential that is not five ``/``-separated parts; a bad
            ``X-Amz-Expires``; ``host`` not signed).
        InvalidSignatureError: the date is outside the window or the presigned URL has
            expired; the scope's region, service, terminator or date is wrong; both header
            and query auth are present; ``x-amz-content-sha256`` is malformed or does not
            match the body.
        ValueError: ``now`` is naive (a programming error, not a client error).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    index = _header_index(headers)
    query = _parse_query(query_string)
    query_names = {name for name, _ in query}
    has_header = any(value.strip() for value in index.get("authorization", ()))
    has_query = any(name in query_names for name in _QUERY_AUTH_PARAMS)

    if has_header and has_query:
        raise InvalidSignatureError(
            "Found both 'X-Amz-Algorithm' as a query-string param "
            "and 'Authorization' as HTTP header."
        )
    if has_header:
        raw = _from_header(index)
    elif has_query:
        raw = _from_query(query, index)
    else:
        raise MissingAuthenticationTokenError(MISSING_AUTHENTICATION_MESSAGE)

    amz_date = _parse_date(raw.date_text, http_date=raw.date_is_http)
    access_key_id, scope = _split_credential(raw.credential)
    signed = tuple(sorted(raw.signed_headers.split(";")))
    if "host" not in signed and ":authority" not in signed:
        raise IncompleteSignatureError(HOST_NOT_SIGNED_MESSAGE)

    # The basic-format text as sent is what botocore signed; an HTTP Date is reformatted.
    amz_text = raw.date_text if not raw.date_is_http else _amz(amz_date)
    valid_until = _check_window(amz_date, now, max_skew, raw.expires)
    _check_scope(scope, amz_text, expected_service, allowed_regions)
    payload_hash = _payload_hash(index, body)

    canonical_request = "\n".join(
        (
            method.upper(),
            _canonical_uri(path),
            _canonical_query(query, drop_signature=has_query),
            "".join(f"{name}:{_header_value(index, name)}\n" for name in signed),
            ";".join(signed),
            payload_hash,
        )
    )
    string_to_sign = "\n".join(
        (
            ALGORITHM,
            amz_text,
            "/".join(scope),
            hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
        )
    )
    return ParsedAuth(
        access_key_id=access_key_id,
        date=scope[0],
        region=scope[1],
        service=scope[2],
        signed_headers=signed,
        signature=raw.signature,
        amz_date=amz_date,
        string_to_sign=string_to_sign,
        session_token=raw.session_token,
        valid_until=valid_until,
        presigned=has_query,
    )


class ReplayCache:
    """Remembers ``(access_key_id, signature)`` pairs until they could no longer verify.

    Each entry lives until ``ParsedAuth.valid_until`` (or ``amz_date + window`` when that
    is unset), so a signature is refused for as long as it would otherwise be accepted.
    Thread-safe. Memory is bounded by ``max_entries``: past it, the entries closest to
    expiry are dropped first, and those could then be replayed until they expire.

    Call :meth:`check_and_remember` only after :func:`verify_signature` succeeds, or
    forged signatures fill the cache.

    A signature covers the time only to the second, so two identical calls a client
    makes within one second carry the same signature. SDKs tell such calls apart by
    per-call headers they add after signing (``amz-sdk-invocation-id``, and
    ``amz-sdk-request`` with the attempt number); the caller passes them as
    ``client_tag``, and an entry is ``(access_key_id, signature, client_tag)``.
    Security: those headers are not signed, so this refuses verbatim resubmission
    only; someone holding a captured request can still replay it until the signature
    expires by changing them, exactly as AWS allows (the date window is the limit).
    A client without such headers that repeats an identical call within one second
    is refused ("Signature has already been used.").
    """

    def __init__(
        self, *, window: timedelta = timedelta(minutes=5), max_entries: int = 200_000
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._window = window
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._deadlines: dict[tuple[str, str, str], datetime] = {}
        self._heap: list[tuple[datetime, tuple[str, str, str]]] = []

    def __len__(self) -> int:
        with self._lock:
            return len(self._deadlines)

    def check_and_remember(
        self, parsed: ParsedAuth, now: datetime, *, client_tag: str = ""
    ) -> None:
        """Remember this request's signature, refusing one already seen.

        ``client_tag``: the unsigned per-call headers of the request (see the class
        docstring); it is hashed, so its length does not grow the cache.

        Raises ``InvalidSignatureError("Signature has already been used.")`` when the same
        access key, signature and client tag were remembered before and have not aged out.
        """
        tag = hashlib.sha256(client_tag.encode("utf-8", "surrogateescape")).hexdigest()
        key = (parsed.access_key_id, parsed.signature.lower(), tag)
        deadline = parsed.valid_until or parsed.amz_date + self._window
        with self._lock:
            self._evict_expired(now)
            if key in self._deadlines:
                raise InvalidSignatureError(REPLAYED_MESSAGE)
            self._deadlines[key] = deadline
            heapq.heappush(self._heap, (deadline, key))
            while len(self._deadlines) > self._max_entries:
                _, oldest = heapq.heappop(self._heap)
                del self._deadlines[oldest]

    def _evict_expired(self, now: datetime) -> None:
        while self._heap and self._heap[0][0] < now:
            _, key = heapq.heappop(self._heap)
            del self._deadlines[key]


@dataclass(frozen=True)
class _RawAuth:
    credential: str
    signed_headers: str
    signature: str = field(repr=False)
    date_text: str
    date_is_http: bool
    session_token: str | None = field(repr=False)
    expires: timedelta | None


def _from_header(index: dict[str, list[str]]) -> _RawAuth:
    values = [value for value in index["authorization"] if value.strip()]
    if len(values) > 1:
        raise IncompleteSignatureError("Only one 'Authorization' header is allowed.")
    header = values[0].strip()
    algorithm, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    for part in rest.split(","):
        item = part.strip()
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not eq and algorithm != ALGORITHM:
            continue  # another scheme (Bearer, SigV2): AWS just lists what is missing
        if not eq:
            raise IncompleteSignatureError(
                f"'{_clip(item)}' not a valid key=value pair (missing equal-sign) "
                f"in Authorization header: '{_clip(algorithm)} ...'"
            )
        params[name.strip()] = value.strip()  # the last repeat wins, as in AWS

    missing = [
        f"Authorization header requires '{name}' parameter."
        for name in ("Credential", "Signature", "SignedHeaders")
        if name not in params
    ]
    date_values = index.get("x-amz-date") or index.get("date") or []
    if not date_values:
        missing.append(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header."
        )
    if missing:
        raise IncompleteSignatureError(f"{' '.join(missing)} Authorization={_clip(algorithm)}")
    if algorithm != ALGORITHM:
        raise IncompleteSignatureError(f"Unsupported AWS 'algorithm': '{_clip(algorithm)}'.")
    token = index.get("x-amz-security-token")
    return _RawAuth(
        credential=params["Credential"],
        signed_headers=params["SignedHeaders"],
        signature=params["Signature"],
        date_text=date_values[0].strip(),
        date_is_http="x-amz-date" not in index,
        session_token=token[0].strip() if token else None,
        expires=None,
    )


def _from_query(query: list[tuple[str, str]], index: dict[str, list[str]]) -> _RawAuth:
    first: dict[str, str] = {}
    for name, value in query:
        first.setdefault(name, value)  # the first repeat wins, as in AWS
    missing = [
        f"AWS query-string parameters must include '{name}'."
        for name in _QUERY_REQUIRED
        if not first.get(name)
    ]
    if missing:
        raise IncompleteSignatureError(
            f"{' '.join(missing)} Re-examine the query-string parameters."
        )
    if first["X-Amz-Algorithm"] != ALGORITHM:
        raise IncompleteSignatureError(
            f"Unsupported AWS 'algorithm': '{_clip(first['X-Amz-Algorithm'])}'."
        )
    token = first.get("X-Amz-Security-Token")
    if token is None and "x-amz-security-token" in index:
        token = index["x-amz-security-token"][0].strip()
    expires = first.get("X-Amz-Expires")
    return _RawAuth(
        credential=first["X-Amz-Credential"],
        signed_headers=first["X-Amz-SignedHeaders"],
        signature=first["X-Amz-Signature"],
        date_text=first["X-Amz-Date"],
        date_is_http=False,
        session_token=token,
        expires=None if expires is None else _parse_expires(expires),
    )


def _parse_expires(text: str) -> timedelta:
    if text.startswith("-"):
        raise IncompleteSignatureError("X-Amz-Expires must be non-negative")
    if not text.isdigit():
        raise IncompleteSignatureError("X-Amz-Expires should be a number")
    expires = timedelta(seconds=int(text))
    if expires > MAX_PRESIGNED_EXPIRES:
        raise IncompleteSignatureError(
            "X-Amz-Expires must be less than a week (in seconds); that is, the given "
            "X-Amz-Expires must be less than 604800 seconds"
        )
    return expires


def _parse_date(text: str, *, http_date: bool) -> datetime:
    bad = IncompleteSignatureError(
        f"Date must be in ISO-8601 'basic format'. Got '{_clip(text)}'. "
        "See http://en.wikipedia.org/wiki/ISO_8601"
    )
    if http_date:
        try:
            parsed = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            raise bad from None
        if parsed.tzinfo is None:  # "-0000": UTC by RFC 5322
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    if not _AMZ_DATE_SHAPE.fullmatch(text):
        raise bad
    try:  # YYYYMMDDTHHMMSSZ, digits checked above; strptime costs 20 us more
        return datetime(
            int(text[0:4]), int(text[4:6]), int(text[6:8]),
            int(text[9:11]), int(text[11:13]), int(text[13:15]), tzinfo=UTC,
        )  # fmt: skip
    except ValueError:
        raise bad from None


def _split_credential(credential: str) -> tuple[str, tuple[str, str, str, str]]:
    parts = credential.split("/")
    if len(parts) != 5:
        raise IncompleteSignatureError(
            "Credential must have exactly 5 slash-delimited elements, "
            f"e.g. keyid/date/region/service/term, got '{_clip(credential, 120)}'"
        )
    return parts[0], (parts[1], parts[2], parts[3], parts[4])


def _check_window(
    amz_date: datetime, now: datetime, max_skew: timedelta, expires: timedelta | None
) -> datetime:
    """Raise unless ``amz_date`` is acceptable at ``now``; return the last acceptable instant."""
    if amz_date > now + max_skew:
        raise InvalidSignatureError(
            f"Signature not yet current: {_amz(amz_date)} is still later than "
            f"{_amz(now + max_skew)} ({_amz(now)} + {_duration(max_skew)}.)"
        )
    window = max_skew if expires is None else expires
    if amz_date < now - window:
        raise InvalidSignatureError(
            f"Signature expired: {_amz(amz_date)} is now earlier than "
            f"{_amz(now - window)} ({_amz(now)} - {_duration(window)}.)"
        )
    return amz_date + window


def _check_scope(
    scope: tuple[str, str, str, str],
    amz_text: str,
    expected_service: str | None,
    allowed_regions: Collection[str] | None,
) -> None:
    date, region, service, terminator = scope
    problems = []
    if not region or (allowed_regions is not None and region not in allowed_regions):
        problems.append(f"Credential should be scoped to a valid region, not '{_clip(region)}'. ")
    if expected_service is not None and service != expected_service:
        problems.append(f"Credential should be scoped to correct service: '{expected_service}'. ")
    if terminator != TERMINATOR:
        problems.append(
            f"Credential should be scoped with a valid terminator: '{TERMINATOR}', "
            f"not '{_clip(terminator)}'. "
        )
    if date != amz_text[:8]:
        problems.append(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            f"from HTTP: '{_clip(date)}' != '{amz_text[:8]}', from '{amz_text}'. "
        )
    if problems:
        raise InvalidSignatureError("".join(problems))


def _payload_hash(index: dict[str, list[str]], body: bytes) -> str:
    body_hash = hashlib.sha256(body).hexdigest()
    declared = index.get("x-amz-content-sha256")
    if not declared:
        return body_hash
    value = declared[0].strip()
    if value == UNSIGNED_PAYLOAD:
        return value
    if not _SHA256_HEX.fullmatch(value):
        raise InvalidSignatureError(CONTENT_SHA256_INVALID_MESSAGE)
    if value.lower() != body_hash:
        raise InvalidSignatureError(CONTENT_SHA256_MISMATCH_MESSAGE)
    return value


def _canonical_uri(path: str) -> str:
    # botocore: remove dot segments and empty segments, then encode the wire path once more.
    path = path.partition("?")[0]
    if not path or path == "/":  # every KMS and STS call
        return "/"
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    trailing = "/" if path.endswith("/") and segments else ""
    leading = "/" if path.startswith("/") else ""
    return quote(leading + "/".join(segments) + trailing, safe="/~")


def _parse_query(query_string: str) -> list[tuple[str, str]]:
    pairs = []
    for item in query_string.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((unquote_plus(name), unquote_plus(value)))
    return pairs


def _canonical_query(query: list[tuple[str, str]], *, drop_signature: bool) -> str:
    if not query:
        return ""
    encoded = sorted(
        (quote(name, safe=_UNRESERVED), quote(value, safe=_UNRESERVED))
        for name, value in query
        if not (drop_signature and name == "X-Amz-Signature")
    )
    return "&".join(f"{name}={value}" for name, value in encoded)


def _header_index(headers: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for name, value in headers:
        index.setdefault(name.strip().lower(), []).append(value)
    return index


def _header_value(index: dict[str, list[str]], name: str) -> str:
    # Trim and collapse inner whitespace per value; repeats joined by "," in received order.
    return ",".join(" ".join(value.split()) for value in index.get(name.lower(), ()))


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def _amz(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_AMZ_DATE_FORMAT)


def _duration(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} sec"


def _clip(text: str, limit: int = _ECHO_LIMIT) -> str:
    """Client text for an error message: short, so a signature or token is never echoed whole."""
    return text if len(text) <= limit else f"{text[: limit // 2]}..."
