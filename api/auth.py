"""Authenticators: SigV4 against the ledger's principals, and dev mode.

``SigV4Authenticator`` verifies every request's signature (botocore's canonical
request, 5 minutes of clock skew, scope service ``kms`` or ``sts``, any region: the
scope selects the region the request acts in) against the access key's secret, which
the ledger unseals in the HSM; a signature is accepted once (replay cache).

``DevAuthenticator`` (``keyledger serve --dev``, loopback only) accepts any access key
and verifies nothing: a 12-digit access key id is that account's root, any other the
default account's root, as moto and LocalStack do.

Security: derived signing keys are cached in memory (never logged) for a minute, so a
disabled principal or access key stops authenticating within that minute at most; the
ledger also refuses a disabled principal at authorization on every call. The replay
cache refuses a verbatim resubmission only (see ``ReplayCache``): SDK calls that are
identical within one second differ in their unsigned ``amz-sdk-invocation-id``.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

from api.app import RequestParts
from api.sigv4 import ParsedAuth, ReplayCache, parse_and_canonicalise, signing_key, verify_signature
from ledger.domain.principals import root_arn
from ledger.errors import AuthError, MissingAuthenticationTokenError
from ledger.service import Caller
from ledger.settings import Settings

_CACHE_SECONDS = 60.0
_CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/\d{8}/([a-z0-9-]+)/")
_ACCOUNT_RE = re.compile(r"^\d{12}$")
_CLIENT_TAG_HEADERS = ("amz-sdk-invocation-id", "amz-sdk-request")


class SigV4Authenticator:
    """Verifies SigV4 requests against principals stored in the ledger."""

    def __init__(self, ledger: Any, settings: Settings) -> None:
        self.ledger = ledger
        self.settings = settings
        self.replay = ReplayCache()
        self._keys: dict[tuple[str, str, str, str], tuple[float, bytes, str, str]] = {}
        self._lock = threading.Lock()

    def _signing_key(self, parsed: ParsedAuth) -> tuple[bytes, str, str]:
        """(signing key, principal ARN, account); raises UnrecognizedClientError."""
        k = (parsed.access_key_id, parsed.date, parsed.region, parsed.service)
        now = time.monotonic()
        with self._lock:
            hit = self._keys.get(k)
        if hit is not None and now - hit[0] < _CACHE_SECONDS:
            return hit[1], hit[2], hit[3]
        secret, principal = self.ledger.access_key_secret(parsed.access_key_id)
        key = signing_key(secret, parsed.date, parsed.region, parsed.service)
        with self._lock:
            if len(self._keys) > 10_000:
                self._keys.clear()
            self._keys[k] = (now, key, principal.arn, principal.account)
        return key, principal.arn, principal.account

    def authenticate(self, req: RequestParts, *, service: str) -> Caller:
        """The verified caller. Raises MissingAuthenticationTokenError,
        IncompleteSignatureError, InvalidSignatureError (bad, stale or replayed
        signature), UnrecognizedClientError (unknown or disabled access key)."""
        now = datetime.now(UTC)
        parsed = parse_and_canonicalise(
            method=req.method,
            path=req.path,
            query_string=req.query_string,
            headers=req.headers,
            body=req.body,
            now=now,
            expected_service=service,
        )
        key, arn, account = self._signing_key(parsed)
        verify_signature(parsed, key)
        self.replay.check_and_remember(parsed, now, client_tag=_client_tag(req))
        return Caller(
            principal=arn,
            source_ip=req.client_ip,
            user_agent=req.header("user-agent"),
            account_id=account,
            region=parsed.region,
            access_key_id=parsed.access_key_id,
        )


class DevAuthenticator:
    """Accepts any access key (dev mode): no signature is checked."""

    def __init__(self, settings: Settings, *, default_account: str) -> None:
        self.settings = settings
        self.default_account = default_account

    def authenticate(self, req: RequestParts, *, service: str) -> Caller:
        """The account root named by the access key id; never raises for a missing or
        bad signature."""
        header = req.header("authorization") or ""
        m = _CREDENTIAL_RE.search(header)
        if m is None:
            cred = _query_value(req.query_string, "X-Amz-Credential") or ""
            parts = cred.split("/")
            access_key, region = (parts[0], parts[2]) if len(parts) >= 3 else ("", "")
        else:
            access_key, region = m.group(1), m.group(2)
        account = access_key if _ACCOUNT_RE.match(access_key) else self.default_account
        return Caller(
            principal=root_arn(account),
            source_ip=req.client_ip,
            user_agent=req.header("user-agent"),
            account_id=account,
            region=region or self.settings.region,
            access_key_id=access_key or None,
        )


def _client_tag(req: RequestParts) -> str:
    """The unsigned per-call headers SDKs send (invocation id, attempt), which tell two
    identical calls signed within the same second apart (see ``ReplayCache``)."""
    return "\n".join(req.header(name) or "" for name in _CLIENT_TAG_HEADERS)


def _query_value(query: str, name: str) -> str | None:
    from urllib.parse import parse_qsl

    for k, v in parse_qsl(query, keep_blank_values=True):
        if k == name:
            return v
    return None


def build_authenticator(
    ledger: Any, settings: Settings, *, dev: bool, default_account: str
) -> SigV4Authenticator | DevAuthenticator:
    """The authenticator for a server: dev mode or SigV4 against the ledger."""
    if dev:
        return DevAuthenticator(settings, default_account=default_account)
    return SigV4Authenticator(ledger, settings)


__all__ = [
    "AuthError",
    "DevAuthenticator",
    "MissingAuthenticationTokenError",
    "SigV4Authenticator",
    "build_authenticator",
]
