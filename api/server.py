"""Run the KeyLedger HTTP API under uvicorn.

One worker: the app is built in this process. Several workers: uvicorn spawns fresh
processes that each call ``app_from_env`` (``factory=True``), so every worker opens its
own ledger and PKCS#11 session after it starts, never inherited across a fork; all a
worker needs travels in ``KEYLEDGER_*`` environment variables.

Limits: ``limit_concurrency`` (503 beyond it), ``timeout_keep_alive``, a 16 KiB limit
on request headers (h11's incomplete-event size; h11 is forced so the limit applies),
the body limit and request timeout of ``create_app``. Shutdown is uvicorn's graceful
one; the lifespan hook closes the ledger and the keystore.

Inline (``--inline``, ``KEYLEDGER_API_INLINE``; ``inline_enabled``): with SoftHSM2 the
cryptographic operations and the reads of one key (``api.app.INLINE_OPERATIONS``) run
on the event loop and a committer stores their records in groups
(``api.app.create_app``, ``api.committer``); other operations, and all of them with
another PKCS#11 module, take one worker-thread hop each.

``X-Forwarded-For`` is not trusted (``proxy_headers`` off): the audit log records the
peer address. Behind a proxy, pass ``forwarded_allow_ips`` explicitly.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledger.errors import UnsupportedOperationError, ValidationError
from ledger.settings import Settings

if TYPE_CHECKING:
    from api.app import KeyLedgerApp
    from ledger.service import KeyLedger

logger = logging.getLogger("keyledger.api")

ENV_DEV = "KEYLEDGER_API_DEV"
ENV_DEV_ACCOUNT = "KEYLEDGER_API_DEV_ACCOUNT"
ENV_MAX_BODY = "KEYLEDGER_API_MAX_BODY"
ENV_REQUEST_TIMEOUT = "KEYLEDGER_API_REQUEST_TIMEOUT"
ENV_INLINE = "KEYLEDGER_API_INLINE"
INLINE_CHOICES = ("auto", "on", "off")
DEFAULT_DEV_ACCOUNT = "000000000000"
MAX_HEADER_BYTES = 16 * 1024
SQLITE_NAME = "ledger.sqlite3"


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (brackets allowed)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_dev_host(host: str) -> None:
    """Raise ValidationError unless dev mode binds a loopback address only."""
    if not is_loopback(host):
        raise ValidationError(
            f"--dev serves without real authentication and may only bind a loopback "
            f"address (127.0.0.1, ::1, localhost), not {host!r}."
        )


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``KEYLEDGER_*`` variables ``Settings.from_env`` reads back to ``settings``."""
    values: dict[str, str | None] = {
        "KEYLEDGER_DATA_DIR": str(settings.data_dir),
        "KEYLEDGER_DATABASE_URL": settings.database_url,
        "KEYLEDGER_PKCS11_MODULE": settings.pkcs11_module,
        "KEYLEDGER_HSM_TOKEN": settings.hsm_token,
        "KEYLEDGER_HSM_PIN": settings.hsm_pin,
        "KEYLEDGER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "KEYLEDGER_REGION": settings.region,
        "KEYLEDGER_ACCOUNT_ID": settings.account_id,
        "KEYLEDGER_PRINCIPAL": settings.principal,
        "KEYLEDGER_ON_DEMAND_ROTATION_LIMIT": str(settings.on_demand_rotation_limit),
        "KEYLEDGER_CHECKPOINT_EVERY_SECONDS": str(settings.checkpoint_every_seconds),
        "KEYLEDGER_CHECKPOINT_EVERY_EVENTS": str(settings.checkpoint_every_events),
        "KEYLEDGER_CHECKPOINT_HEARTBEAT_SECONDS": str(settings.checkpoint_heartbeat_seconds),
    }
    return {k: v for k, v in values.items() if v is not None}


def inline_enabled(settings: Settings, choice: str = "auto") -> bool:
    """Whether ``INLINE_OPERATIONS`` run on the event loop (``create_app``'s
    ``inline_operations``). ``auto``: only with SoftHSM2 (the embedded token, or a
    ``KEYLEDGER_PKCS11_MODULE`` named like libsofthsm2), whose calls run in process in
    microseconds; another PKCS#11 module may be a network HSM, whose latency would stall
    the loop. Raises ValidationError for a choice not in ``INLINE_CHOICES``."""
    if choice not in INLINE_CHOICES:
        raise ValidationError(f"--inline must be one of {', '.join(INLINE_CHOICES)}.")
    if choice != "auto":
        return choice == "on"
    module = settings.pkcs11_module
    return module is None or "softhsm" in Path(module).name.lower()


def close_ledger(ledger: Any) -> None:
    """Close the ledger's database and its keystore (HSM session)."""
    try:
        ledger.keystore.close()
    finally:
        ledger.close()


def _health(ledger: Any) -> None:
    """A cheap end-to-end database read; raises when the ledger is unreachable."""
    ledger.db.read_records(0, 1)


def archive_sqlite(data_dir: Path, *, now: datetime | None = None) -> Path | None:
    """Rename ``ledger.sqlite3`` (and its -wal/-shm files) to
    ``ledger.sqlite3.archived-<UTC timestamp>``; returns the new path, or None when
    there was no database. Call only with the ledger closed."""
    db = data_dir / SQLITE_NAME
    if not db.exists():
        return None
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    target = db.with_name(f"{SQLITE_NAME}.archived-{stamp}")
    db.rename(target)
    for suffix in ("-wal", "-shm"):
        side = db.with_name(SQLITE_NAME + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    return target


def reset_ledger(ledger: KeyLedger, settings: Settings) -> KeyLedger:
    """Dev reset: close ``ledger``'s database, archive it, open a fresh ledger.

    The keystore (HSM session) is kept and handed to the new ledger; HSM objects of
    the archived ledger stay in the token, unused. PostgreSQL ledgers are not reset
    (UnsupportedOperationError): a shared database is never moved aside by one node.
    """
    from ledger.bootstrap import open_ledger

    if settings.database_url:
        raise UnsupportedOperationError("Reset is not supported for PostgreSQL ledgers.")
    keystore, clock = ledger.keystore, ledger.clock
    ledger.close()
    archived = archive_sqlite(settings.data_dir)
    logger.warning("dev reset: archived the ledger database as %s", archived)
    return open_ledger(settings, keystore=keystore, clock=clock)


def build_app(
    settings: Settings,
    *,
    dev: bool = False,
    default_account: str = DEFAULT_DEV_ACCOUNT,
    max_body: int | None = None,
    request_timeout: float | None = None,
    inline: str = "auto",
    keystore: Any | None = None,
    commit_on_loop: bool | None = None,
) -> KeyLedgerApp:
    """Open the ledger, keystore and authenticator for ``settings`` and build the app.

    ``keystore``: an open keystore to use instead of opening the settings' own (one
    SoftHSM2 conf per process: tests share the session's token); the app's shutdown
    closes it. ``commit_on_loop`` (default: for SQLite, not for PostgreSQL): see
    ``api.app.create_app``. Raises HsmError or the database driver's error when they
    cannot be opened, ValidationError for a bad ``inline`` choice (``inline_enabled``).
    """
    from api.app import DEFAULT_MAX_BODY, INLINE_OPERATIONS, AppState, create_app
    from api.auth import build_authenticator
    from api.backend import KmsBackend
    from ledger.bootstrap import open_ledger

    inline_operations = INLINE_OPERATIONS if inline_enabled(settings, inline) else frozenset()

    ledger: Any = KmsBackend(open_ledger(settings, keystore=keystore))
    try:
        authenticator = build_authenticator(
            ledger, settings, dev=dev, default_account=default_account
        )
    except BaseException:
        close_ledger(ledger)
        raise
    holder: dict[str, AppState] = {}

    def reset() -> tuple[Any, Any]:
        fresh = KmsBackend(reset_ledger(holder["state"].ledger.ledger, settings))
        return fresh, build_authenticator(fresh, settings, dev=dev, default_account=default_account)

    def health() -> None:
        _health(holder["state"].ledger)

    def shutdown() -> None:
        close_ledger(holder["state"].ledger)

    app = create_app(
        ledger=ledger,
        authenticator=authenticator,
        dev=dev,
        reset=reset if dev else None,
        health=health,
        on_shutdown=shutdown,
        max_body=max_body or DEFAULT_MAX_BODY,
        request_timeout=request_timeout or 30.0,
        inline_operations=inline_operations,
        commit_on_loop=(
            not settings.database_url if commit_on_loop is None else commit_on_loop
        ),  # SQLite: see api.committer
    )
    holder["state"] = app.state.keyledger
    return app


def _options_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    return {
        "dev": env.get(ENV_DEV) == "1",
        "default_account": env.get(ENV_DEV_ACCOUNT) or DEFAULT_DEV_ACCOUNT,
        "max_body": int(env[ENV_MAX_BODY]) if env.get(ENV_MAX_BODY) else None,
        "request_timeout": (
            float(env[ENV_REQUEST_TIMEOUT]) if env.get(ENV_REQUEST_TIMEOUT) else None
        ),
        "inline": env.get(ENV_INLINE) or "auto",
    }


def app_from_env() -> KeyLedgerApp:
    """uvicorn factory for worker processes: everything comes from ``KEYLEDGER_*``."""
    options = _options_from_env(os.environ)
    if options["dev"]:
        raise ValidationError("Dev mode runs a single worker.")  # see serve()
    return build_app(Settings.from_env(), **options)


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    dev: bool = False,
    default_account: str = DEFAULT_DEV_ACCOUNT,
    max_body: int | None = None,
    request_timeout: float | None = None,
    limit_concurrency: int | None = 1000,
    timeout_keep_alive: int = 5,
    log_level: str = "info",
    access_log: bool = False,
    inline: str = "auto",
) -> None:
    """Run the API until interrupted (blocks).

    Raises ValidationError for ``dev`` on a non-loopback host, ``dev`` with several
    workers (a reset in one worker could not swap the others' ledgers), or an
    ``inline`` choice not in ``INLINE_CHOICES``.
    """
    import uvicorn

    if workers < 1:
        raise ValidationError("--workers must be at least 1.")
    inline_enabled(settings, inline)  # refuse a bad choice before binding
    if dev:
        check_dev_host(host)
        if workers > 1:
            raise ValidationError("--dev runs a single worker (reset swaps one ledger).")
    from api.nodelay import http_protocol

    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": http_protocol(),
        "access_log": access_log,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "limit_concurrency": limit_concurrency,
        "timeout_keep_alive": timeout_keep_alive,
        "timeout_graceful_shutdown": 30,
        "proxy_headers": False,
        "server_header": False,
        "log_level": log_level,
        "lifespan": "on",
        "loop": "auto",  # uvloop when installed
    }
    if workers == 1:
        app = build_app(
            settings,
            dev=dev,
            default_account=default_account,
            max_body=max_body,
            request_timeout=request_timeout,
            inline=inline,
        )
        uvicorn.run(app, **common)
        return
    # Create the HSM domain key once, before the workers fork (each opens its own
    # session in the child; creating the key is not atomic across processes).
    from ledger.bootstrap import open_keystore

    open_keystore(settings).close()
    os.environ.update(settings_env(settings))
    os.environ[ENV_DEV] = "0"
    if max_body is not None:
        os.environ[ENV_MAX_BODY] = str(max_body)
    if request_timeout is not None:
        os.environ[ENV_REQUEST_TIMEOUT] = str(request_timeout)
    os.environ[ENV_INLINE] = inline
    uvicorn.run("api.server:app_from_env", factory=True, workers=workers, **common)


__all__ = [
    "app_from_env",
    "archive_sqlite",
    "build_app",
    "check_dev_host",
    "close_ledger",
    "inline_enabled",
    "is_loopback",
    "reset_ledger",
    "serve",
    "settings_env",
]
