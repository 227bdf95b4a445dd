"""The ASGI application: AWS KMS JSON 1.1 (``X-Amz-Target: TrentService.<Op>``) and
STS ``GetCallerIdentity`` (Query protocol) on ``POST /``.

Request path: read the body (at most ``max_body`` bytes; never more is buffered) ->
authenticate (SigV4 service ``kms``, or ``sts`` for form-urlencoded bodies) -> parse and
validate against botocore's model -> call the KeyLedger operation in a worker thread ->
serialize. Every response carries ``x-amzn-RequestId``.

Audit: every failure before the operation runs (oversize body, authentication, unknown
target, malformed or invalid body, unsupported members) is recorded with
``ledger.record_rejected`` under the authenticated caller, or ``anonymous`` when
authentication failed. Errors the operation raises are recorded by the service itself
and not again here. If the rejection cannot be recorded, the answer is 500.

Timeout: an operation still running after ``request_timeout`` seconds is answered
``DependencyTimeoutException`` (503, retried by the SDKs); its thread cannot be
killed and runs to completion, recording its own outcome. Abandoned threads no longer
count against ``max_threads``.

Security: request bodies, plaintexts and exception messages of unexpected errors are
never logged or returned; a 500 says only "An internal error occurred."
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.to_thread
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import protocol, sts
from ledger.errors import KeyLedgerError, UnknownOperationError, ValidationError
from ledger.service import Caller

logger = logging.getLogger("keyledger.api")

REQUEST_ID_HEADER = "x-amzn-RequestId"
_REQUEST_ID_KEY = "keyledger.request_id"
DEFAULT_MAX_BODY = 1_048_576
_CREDENTIAL = re.compile(r"Credential=([A-Za-z0-9]{1,128})/")
_MAX_USER_AGENT = 1024
_MAX_KEY_ID = 2048


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
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


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


class _RequestIdMiddleware:
    """Gives every request an id (uuid4) and every response its header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        scope[_REQUEST_ID_KEY] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() != b"x-amzn-requestid"
                ]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _json(status: int, body: bytes, content_type: str = protocol.CONTENT_TYPE) -> Response:
    return Response(content=body, status_code=status, media_type=content_type)


def _log_unexpected(exc: BaseException, where: str, request_id: str) -> None:
    """Log type and stack only: an exception's message could hold request data."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    logger.error(
        "unexpected %s during %s (request %s)\n%s", type(exc).__name__, where, request_id, stack
    )


def _internal() -> KeyLedgerError:
    return KeyLedgerError(protocol.INTERNAL_MESSAGE)


async def _read_body(request: Request, max_body: int) -> bytes:
    """The body, or _BodyTooLarge as soon as more than ``max_body`` bytes arrive."""
    too_large = _BodyTooLarge(f"Request body must be at most {max_body} bytes.")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_body:
                raise too_large
        except ValueError:
            raise ValidationError("Content-Length is not a number.") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _request_parts(request: Request, body: bytes) -> RequestParts:
    return RequestParts(
        method=request.method,
        path=(request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1"),
        query_string=request.scope.get("query_string", b"").decode("latin-1"),
        headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw),
        body=body,
        client_ip=request.client.host if request.client else None,
    )


def _anonymous(request: Request) -> Caller:
    """The caller recorded for a request that did not authenticate."""
    auth = request.headers.get("authorization", "") or request.query_params.get(
        "X-Amz-Credential", ""
    )
    if auth and "Credential=" not in auth:
        auth = f"Credential={auth}"
    match = _CREDENTIAL.search(auth)
    agent = request.headers.get("user-agent")
    return Caller(
        principal="anonymous",
        source_ip=request.client.host if request.client else None,
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
) -> Starlette:
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
    """
    state = AppState(ledger, authenticator)
    limiter = anyio.CapacityLimiter(max_threads)

    async def in_thread(fn: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(fn, limiter=limiter)

    async def reject(
        led: Any, operation: str, caller: Caller, request: dict[str, Any], err: KeyLedgerError
    ) -> None:
        await in_thread(
            functools.partial(
                led.record_rejected, operation=operation, caller=caller, request=request, error=err
            )
        )

    async def answer_rejected(
        request: Request,
        led: Any,
        operation: str,
        caller: Caller,
        err: KeyLedgerError,
        body: bytes,
        render: Callable[[KeyLedgerError], Response],
    ) -> Response:
        request_id = request.scope[_REQUEST_ID_KEY]
        summary = {} if isinstance(err, _BodyTooLarge) else _request_summary(body)
        try:
            await reject(led, operation, caller, summary, err)
        except Exception as exc:  # the ledger is down: fail closed, say nothing more
            _log_unexpected(exc, "record_rejected", request_id)
            return render(_internal())
        return render(err)

    async def kms_or_sts(request: Request) -> Response:
        request_id: str = request.scope[_REQUEST_ID_KEY]
        led, auth = state.current
        query = sts.is_query_request(request.headers.get("content-type"))
        if query:
            return await handle_sts(request, led, auth, request_id)
        operation = _operation_of(request.headers.get("x-amz-target"))
        label = operation or "Unknown"

        def render(err: KeyLedgerError) -> Response:
            status, payload = protocol.error_body(err)
            return _json(status, payload)

        caller: Caller | None = None
        body = b""
        try:
            body = await _read_body(request, max_body)
            caller = await in_thread(
                functools.partial(auth.authenticate, _request_parts(request, body), service="kms")
            )
            if operation is None:
                raise UnknownOperationError(
                    "X-Amz-Target must name a KMS operation as TrentService.<Operation>."
                )
            params = protocol.parse_request(operation, body)
            method, kwargs = protocol.prepare_call(led, operation, params)
        except KeyLedgerError as err:
            who = caller or _anonymous(request)
            return await answer_rejected(request, led, label, who, err, body, render)
        except Exception as exc:
            _log_unexpected(exc, f"{label} before the operation", request_id)
            who = caller or _anonymous(request)
            return await answer_rejected(request, led, label, who, _internal(), body, render)

        call = functools.partial(method, caller=caller, **kwargs)
        try:
            with anyio.fail_after(request_timeout):
                result = await anyio.to_thread.run_sync(
                    call, limiter=limiter, abandon_on_cancel=True
                )
        except TimeoutError:
            logger.warning(
                "%s timed out after %ss (request %s)", label, request_timeout, request_id
            )
            return render(
                protocol.DependencyTimeoutError(
                    "The system timed out while trying to fulfill the request. "
                    "The request can be retried."
                )
            )
        except KeyLedgerError as err:  # recorded by the service
            return render(err)
        except Exception as exc:
            _log_unexpected(exc, label, request_id)
            with contextlib.suppress(Exception):  # best effort: keep the attempt in the log
                await reject(led, label, caller, _request_summary(body), _internal())
            return render(_internal())
        try:
            payload = protocol.serialize_response(operation, result)
        except Exception as exc:
            _log_unexpected(exc, f"serializing {label}", request_id)
            return render(_internal())
        return _json(200, payload)

    async def handle_sts(
        request: Request, led: Any, auth: Authenticator, request_id: str
    ) -> Response:
        def render(err: KeyLedgerError) -> Response:
            status, payload = sts.error_body(err, request_id)
            return _json(status, payload, sts.CONTENT_TYPE)

        caller: Caller | None = None
        body = b""
        label = "GetCallerIdentity"
        try:
            body = await _read_body(request, max_body)
            caller = await in_thread(
                functools.partial(
                    auth.authenticate, _request_parts(request, body), service=sts.SIGNING_SERVICE
                )
            )
            sts.parse_action(body)
        except KeyLedgerError as err:
            who = caller or _anonymous(request)
            return await answer_rejected(request, led, label, who, err, b"", render)
        except Exception as exc:
            _log_unexpected(exc, "STS", request_id)
            who = caller or _anonymous(request)
            return await answer_rejected(request, led, label, who, _internal(), b"", render)
        return _json(200, sts.get_caller_identity_body(caller, request_id), sts.CONTENT_TYPE)

    async def health_endpoint(request: Request) -> Response:
        try:
            if health is not None:
                await in_thread(health)
        except Exception as exc:
            _log_unexpected(exc, "health check", request.scope[_REQUEST_ID_KEY])
            return _json(503, b'{"status":"unavailable"}', "application/json")
        return _json(200, b'{"status":"ok"}', "application/json")

    async def reset_endpoint(request: Request) -> Response:
        request_id = request.scope[_REQUEST_ID_KEY]
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
            return _json(500, b'{"status":"error"}', "application/json")
        logger.warning("ledger reset (dev mode, request %s)", request_id)
        return _json(200, b'{"status":"ok"}', "application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            try:
                await anyio.to_thread.run_sync(on_shutdown)
            except Exception as exc:
                _log_unexpected(exc, "shutdown", "-")

    routes = [
        Route("/", kms_or_sts, methods=["POST"]),
        Route("/", health_endpoint, methods=["GET"]),
        Route("/health", health_endpoint, methods=["GET"]),
        Route("/_health", health_endpoint, methods=["GET"]),
    ]
    if dev:
        routes.append(Route("/moto-api/reset", reset_endpoint, methods=["POST"]))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(_RequestIdMiddleware)
    app.state.keyledger = state
    return app


__all__ = ["REQUEST_ID_HEADER", "AppState", "Authenticator", "RequestParts", "create_app"]
