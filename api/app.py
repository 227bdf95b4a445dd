"""The ASGI application: AWS KMS JSON 1.1 (``X-Amz-Target: TrentService.<Op>``) and
STS ``GetCallerIdentity`` (Query protocol) on ``POST /``.

Request path: read the body (at most ``max_body`` bytes; never more is buffered) ->
authenticate (SigV4 service ``kms``, or ``sts`` for form-urlencoded bodies) -> parse and
validate against botocore's model -> call the KeyLedger operation in a worker thread ->
serialize. Every response carries ``x-amzn-RequestId``. Inline operations
(``create_app``'s ``inline_operations``) run all of that on the event loop with their
call records deferred, and are answered once a committer (``api.committer``) has
stored the records.

Audit: every failure before the operation runs (oversize body, authentication, unknown
target, malformed or invalid body, unsupported members) is recorded with
``ledger.record_rejected`` under the authenticated caller, or ``anonymous`` when
authentication failed. Errors the operation raises are recorded by the service itself
and not again here. If the rejection cannot be recorded, the answer is 500.

Timeout: an operation still running after ``request_timeout`` seconds is answered
``DependencyTimeoutException`` (503, retried by the SDKs); its thread cannot be
killed and runs to completion, recording its own outcome (it keeps its pool thread
until then). For an inline operation the timeout bounds only the wait for its commit.

Security: request bodies, plaintexts and exception messages of unexpected errors are
never logged or returned; a 500 says only "An internal error occurred."
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import re
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api import protocol, sts
from api.committer import AsyncCommitter, LoopCommitter
from ledger.errors import (
    KeyLedgerError,
    LedgerUnavailableError,
    UnknownOperationError,
    ValidationError,
)
from ledger.service import Caller, deferred_records, record_request_id

logger = logging.getLogger("keyledger.api")

REQUEST_ID_HEADER = "x-amzn-RequestId"
_REQUEST_ID_KEY = "keyledger.request_id"
DEFAULT_MAX_BODY = 1_048_576
_CREDENTIAL = re.compile(r"Credential=([A-Za-z0-9]{1,128})/")
_MAX_USER_AGENT = 1024
_MAX_KEY_ID = 2048
# Run on the event loop (see ``create_app``): calls whose only write is their call
# record and that read nothing but the key: cryptographic calls and reads of one key.
# The catalog-answered listings and GetKeyLastUsage catch a projection up: threads.
INLINE_OPERATIONS = frozenset(
    {
        "DescribeKey",
        "GetKeyPolicy",
        "GetKeyRotationStatus",
        "GetPublicKey",
        "ListKeyPolicies",
        "ListKeyRotations",
        "ListResourceTags",
        "ListGrants",
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GenerateRandom",
        "GenerateMac",
        "VerifyMac",
        "Sign",
        "Verify",
    }
)


@dataclass(frozen=True)
class RequestParts:
    """What an authenticator sees of one HTTP request.

    ``headers`` are the raw pairs in arrival order (names lowercased by ASGI, values
    decoded as Latin-1); ``body`` is the complete body; ``client_ip`` the peer address.
    """

    method: str
    path: str
    query_string: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client_ip: str | None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        return self._first_values.get(name.lower())

    @functools.cached_property
    def _first_values(self) -> dict[str, str]:
        first: dict[str, str] = {}
        for key, value in self.headers:
            first.setdefault(key.lower(), value)
        return first


class Authenticator(Protocol):
    def authenticate(self, req: RequestParts, *, service: str) -> Caller:
        """The authenticated caller; raises AuthError subclasses (and may raise
        AccessDeniedError). Runs in a worker thread."""
        ...


class AppState:
    """The ledger and authenticator the app currently serves; swapped by reset.

    Each request takes one snapshot at its start, so a request never mixes the old
    ledger with the new authenticator.
    """

    def __init__(self, ledger: Any, authenticator: Authenticator) -> None:
        self._lock = threading.Lock()
        self._current: tuple[Any, Authenticator] = (ledger, authenticator)
        self.reset_lock = threading.Lock()

    @property
    def current(self) -> tuple[Any, Authenticator]:
        with self._lock:
            return self._current

    @property
    def ledger(self) -> Any:
        return self.current[0]

    def swap(self, ledger: Any, authenticator: Authenticator) -> tuple[Any, Authenticator]:
        """Serve ``ledger``/``authenticator`` from now on; returns the previous pair."""
        with self._lock:
            old, self._current = self._current, (ledger, authenticator)
        return old


class _BodyTooLarge(ValidationError):
    pass


def _json(
    status: int, body: bytes, content_type: str = protocol.CONTENT_TYPE, request_id: str = ""
) -> Response:
    response = Response(content=body, status_code=status, media_type=content_type)
    response.headers[REQUEST_ID_HEADER] = request_id or str(uuid.uuid4())
    return response


async def _send(send: Send, status: int, body: bytes, content_type: str, request_id: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode("latin-1")),
                (b"content-length", str(len(body)).encode("latin-1")),
                (b"x-amzn-requestid", request_id.encode("latin-1")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _log_unexpected(exc: BaseException, where: str, request_id: str) -> None:
    """Log type and stack only: an exception's message could hold request data."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    logger.error(
        "unexpected %s during %s (request %s)\n%s", type(exc).__name__, where, request_id, stack
    )


def _internal() -> KeyLedgerError:
    return KeyLedgerError(protocol.INTERNAL_MESSAGE)


async def _read_body(
    scope: Scope, receive: Receive, headers: RequestParts | None, max_body: int
) -> bytes:
    """The body, or _BodyTooLarge as soon as more than ``max_body`` bytes arrive."""
    too_large = _BodyTooLarge(f"Request body must be at most {max_body} bytes.")
    declared = headers.header("content-length") if headers is not None else None
    if declared is not None:
        try:
            if int(declared) > max_body:
                raise too_large
        except ValueError:
            raise ValidationError("Content-Length is not a number.") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # client went away
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _request_parts(scope: Scope, body: bytes) -> RequestParts:
    client = scope.get("client")
    return RequestParts(
        method=scope["method"],
        path=(scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
        query_string=scope.get("query_string", b"").decode("latin-1"),
        headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]),
        body=body,
        client_ip=client[0] if client else None,
    )


def _anonymous(parts: RequestParts) -> Caller:
    """The caller recorded for a request that did not authenticate."""
    auth = parts.header("authorization") or ""
    if not auth:
        for k, v in parse_qsl(parts.query_string, keep_blank_values=True):
            if k == "X-Amz-Credential":
                auth = f"Credential={v}"
                break
    match = _CREDENTIAL.search(auth)
    agent = parts.header("user-agent")
    return Caller(
        principal="anonymous",
        source_ip=parts.client_ip,
        user_agent=agent[:_MAX_USER_AGENT] if agent else None,
        access_key_id=match.group(1) if match else None,
    )


def _operation_of(target: str | None) -> str | None:
    """The KMS operation an ``X-Amz-Target`` names, if it is one of the model's."""
    if target is None or not target.startswith(protocol.TARGET_PREFIX):
        return None
    name = target[len(protocol.TARGET_PREFIX) :]
    return name if name in protocol.model_operations() else None


def _request_summary(body: bytes) -> dict[str, Any]:
    """CloudTrail-style requestParameters of a rejected request: only ``keyId``.

    Security: nothing else of the body (plaintext, blobs, tokens) is ever kept.
    """
    try:
        raw = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return {}
    if isinstance(raw, dict):
        key_id = raw.get("KeyId")
        if isinstance(key_id, str) and 0 < len(key_id) <= _MAX_KEY_ID:
            return {"keyId": key_id}
    return {}


class KeyLedgerApp:
    """The ASGI app: ``POST /`` is answered directly (the hot path: one worker-thread
    hop per request, no middleware); everything else goes to a Starlette app (health,
    dev reset, lifespan)."""

    def __init__(self, hot: ASGIApp, rest: Starlette) -> None:
        self._hot = hot
        self._rest = rest
        self.state = rest.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/":
            await self._hot(scope, receive, send)
        else:
            await self._rest(scope, receive, send)


def create_app(
    *,
    ledger: Any,
    authenticator: Authenticator,
    dev: bool = False,
    reset: Callable[[], Any] | None = None,
    health: Callable[[], Any] | None = None,
    on_shutdown: Callable[[], Any] | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    request_timeout: float = 30.0,
    max_threads: int = 40,
    inline_operations: frozenset[str] = frozenset(),
    commit_on_loop: bool = False,
) -> KeyLedgerApp:
    """The KeyLedger HTTP API.

    ``ledger``: a KeyLedger (or any object with its operation methods and
    ``record_rejected``). ``reset`` (dev mode only, ``POST /moto-api/reset``) returns
    the new ``(ledger, authenticator)`` pair, which the app swaps in; it may instead
    return None after swapping through ``app.state.keyledger`` (an AppState) itself.
    ``health`` is called by ``GET /health`` (raise to report unavailable).
    ``on_shutdown`` runs at lifespan shutdown (close the ledger and keystore).
    ``max_body``: 1 MiB by default; the largest valid KMS request is a CreateKey or
    PutKeyPolicy with a 131072-character policy (up to ~768 KiB JSON-escaped) plus
    description and tags, so anything larger cannot be valid.

    ``inline_operations`` (``INLINE_OPERATIONS`` or a subset; none by default) run on the
    event loop itself, their call records stored in groups by a committer
    (``api.committer``), instead of one worker-thread hop per request: about 30% less
    server CPU per call. Only for a keystore whose calls take microseconds (SoftHSM2 in
    process): a slow call would stall every request, and ``request_timeout`` then bounds
    only the wait for the commit, not the operation. ``commit_on_loop``: their records
    are stored by the loop itself (``LoopCommitter``, for SQLite) rather than by a
    committer thread (``AsyncCommitter``, for PostgreSQL).
    """
    state = AppState(ledger, authenticator)
    in_flight = [0]  # inline requests between arrival and answer (event loop only)
    committer: AsyncCommitter | LoopCommitter = (
        LoopCommitter() if commit_on_loop else AsyncCommitter(in_flight=lambda: in_flight[0])
    )
    # A plain executor: one hop per request, cheaper than anyio's thread runner.
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=max_threads, thread_name_prefix="keyledger-api"
    )

    async def in_thread(fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn)

    def record(led: Any, operation: str, caller: Caller, body: bytes, err: KeyLedgerError,
               request_id: str) -> KeyLedgerError:  # fmt: skip
        """Record a rejection; returns the error to answer (internal if not recorded)."""
        summary = {} if isinstance(err, _BodyTooLarge) else _request_summary(body)
        try:
            led.record_rejected(operation=operation, caller=caller, request=summary, error=err)
        except Exception as exc:  # the ledger is down: fail closed, say nothing more
            _log_unexpected(exc, "record_rejected", request_id)
            return _internal()
        return err

    def kms_work(
        led: Any, auth: Authenticator, parts: RequestParts, operation: str | None,
        request_id: str,
    ) -> tuple[int, bytes]:  # fmt: skip
        """Authenticate, parse, run and serialize one KMS request (in a worker thread, or
        on the loop for an inline operation); its record carries ``request_id``."""
        with record_request_id(request_id):
            return _kms_work(led, auth, parts, operation, request_id)

    def _kms_work(
        led: Any, auth: Authenticator, parts: RequestParts, operation: str | None,
        request_id: str,
    ) -> tuple[int, bytes]:  # fmt: skip
        label = operation or "Unknown"
        caller: Caller | None = None
        try:
            caller = auth.authenticate(parts, service="kms")
            if operation is None:
                raise UnknownOperationError(
                    "X-Amz-Target must name a KMS operation as TrentService.<Operation>."
                )
            params = protocol.parse_request(operation, parts.body)
            method, kwargs = protocol.prepare_call(led, operation, params)
        except KeyLedgerError as err:
            who = caller or _anonymous(parts)
            return protocol.error_body(record(led, label, who, parts.body, err, request_id))
        except Exception as exc:
            _log_unexpected(exc, f"{label} before the operation", request_id)
            who = caller or _anonymous(parts)
            return protocol.error_body(record(led, label, who, parts.body, _internal(), request_id))
        try:
            result = method(caller=caller, **kwargs)
        except KeyLedgerError as err:  # recorded by the service
            return protocol.error_body(err)
        except Exception as exc:
            _log_unexpected(exc, label, request_id)
            with contextlib.suppress(Exception):  # best effort: keep the attempt in the log
                record(led, label, caller, parts.body, _internal(), request_id)
            return protocol.error_body(_internal())
        assert operation is not None
        try:
            return 200, protocol.serialize_response(operation, result)
        except Exception as exc:
            _log_unexpected(exc, f"serializing {label}", request_id)
            return protocol.error_body(_internal())

    def sts_work(
        led: Any, auth: Authenticator, parts: RequestParts, request_id: str
    ) -> tuple[int, bytes]:
        with record_request_id(request_id):
            return _sts_work(led, auth, parts, request_id)

    def _sts_work(
        led: Any, auth: Authenticator, parts: RequestParts, request_id: str
    ) -> tuple[int, bytes]:
        label = "GetCallerIdentity"
        caller: Caller | None = None
        try:
            caller = auth.authenticate(parts, service=sts.SIGNING_SERVICE)
            sts.parse_action(parts.body)
        except KeyLedgerError as err:
            who = caller or _anonymous(parts)
            return sts.error_body(record(led, label, who, b"", err, request_id), request_id)
        except Exception as exc:
            _log_unexpected(exc, "STS", request_id)
            who = caller or _anonymous(parts)
            return sts.error_body(record(led, label, who, b"", _internal(), request_id),
                                  request_id)  # fmt: skip
        return 200, sts.get_caller_identity_body(caller, request_id)

    async def post_root(scope: Scope, receive: Receive, send: Send) -> None:
        request_id = str(uuid.uuid4())
        led, auth = state.current
        head = _request_parts(scope, b"")
        query = sts.is_query_request(head.header("content-type"))
        content_type = sts.CONTENT_TYPE if query else protocol.CONTENT_TYPE
        operation = None if query else _operation_of(head.header("x-amz-target"))
        label = "GetCallerIdentity" if query else (operation or "Unknown")

        def render(err: KeyLedgerError) -> tuple[int, bytes]:
            return sts.error_body(err, request_id) if query else protocol.error_body(err)

        try:
            body = await _read_body(scope, receive, head, max_body)
        except KeyLedgerError as err:  # oversize or unreadable: recorded, never buffered

            def rejected(err: KeyLedgerError = err) -> KeyLedgerError:
                with record_request_id(request_id):
                    return record(led, label, _anonymous(head), b"", err, request_id)

            answer = await in_thread(rejected)
            await _send(send, *render(answer), content_type, request_id)
            return
        parts = dataclasses.replace(head, body=body)
        if operation in inline_operations:
            in_flight[0] += 1
            try:
                status, payload = await inline(led, auth, parts, operation, request_id)
            finally:
                in_flight[0] -= 1
            await _send(send, status, payload, content_type, request_id)
            return
        work = (
            functools.partial(sts_work, led, auth, parts, request_id)
            if query
            else functools.partial(kms_work, led, auth, parts, operation, request_id)
        )
        try:
            future = asyncio.get_running_loop().run_in_executor(executor, work)
            # On timeout the thread runs on to completion and records its own outcome.
            status, payload = await asyncio.wait_for(future, request_timeout)
        except TimeoutError:
            logger.warning(
                "%s timed out after %ss (request %s)", label, request_timeout, request_id
            )
            status, payload = render(
                protocol.DependencyTimeoutError(
                    "The system timed out while trying to fulfill the request. "
                    "The request can be retried."
                )
            )
        await _send(send, status, payload, content_type, request_id)

    async def inline(
        led: Any, auth: Authenticator, parts: RequestParts, operation: str, request_id: str
    ) -> tuple[int, bytes]:
        """Run ``operation`` on the loop with its records deferred, then answer once the
        committer has stored them (fail closed: a result is dropped if they are not)."""
        with deferred_records() as records:
            status, payload = kms_work(led, auth, parts, operation, request_id)
        try:
            await asyncio.wait_for(committer.commit(led, records), request_timeout)
        except TimeoutError:
            logger.warning(
                "%s: commit timed out after %ss (request %s)", operation, request_timeout,
                request_id,
            )  # fmt: skip
            return protocol.error_body(
                protocol.DependencyTimeoutError(
                    "The system timed out while trying to fulfill the request. "
                    "The request can be retried."
                )
            )
        except Exception as exc:
            _log_unexpected(exc, f"committing {operation}", request_id)
            return protocol.error_body(
                LedgerUnavailableError("The ledger could not record the request.")
            )
        return status, payload

    async def health_endpoint(request: Request) -> Response:
        request_id = str(uuid.uuid4())
        try:
            if health is not None:
                await in_thread(health)
        except Exception as exc:
            _log_unexpected(exc, "health check", request_id)
            return _json(503, b'{"status":"unavailable"}', "application/json", request_id)
        return _json(200, b'{"status":"ok"}', "application/json", request_id)

    async def reset_endpoint(request: Request) -> Response:
        request_id = str(uuid.uuid4())
        if reset is None:
            return _json(404, b'{"status":"reset is not configured"}', "application/json")

        def run_reset() -> None:
            with state.reset_lock:
                outcome = reset()
                if outcome is not None:
                    new_ledger, new_auth = outcome
                    state.swap(new_ledger, new_auth)

        try:
            await in_thread(run_reset)
        except Exception as exc:
            _log_unexpected(exc, "reset", request_id)
            return _json(500, b'{"status":"error"}', "application/json", request_id)
        logger.warning("ledger reset (dev mode, request %s)", request_id)
        return _json(200, b'{"status":"ok"}', "application/json", request_id)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await in_thread(committer.stop)
        if on_shutdown is not None:
            try:
                await in_thread(on_shutdown)
            except Exception as exc:
                _log_unexpected(exc, "shutdown", "-")
        executor.shutdown(wait=False)

    routes = [
        Route("/", health_endpoint, methods=["GET"]),
        Route("/health", health_endpoint, methods=["GET"]),
        Route("/_health", health_endpoint, methods=["GET"]),
    ]
    if dev:
        routes.append(Route("/moto-api/reset", reset_endpoint, methods=["POST"]))

    async def no_route(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return _json(status, b'{"status":"no such endpoint"}', "application/json")

    rest = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={404: no_route, 405: no_route}
    )
    rest.state.keyledger = state
    return KeyLedgerApp(post_root, rest)


__all__ = [
    "REQUEST_ID_HEADER",
    "AppState",
    "Authenticator",
    "KeyLedgerApp",
    "RequestParts",
    "create_app",
]
