"""The composition root: picks the event store, the HSM adapter and the clock."""

from __future__ import annotations

from ledger.clock import Clock
from ledger.keystore.port import KeyStore
from ledger.persistence import ensure_postgres_schema, postgres_env, sqlite_env
from ledger.service import KeyLedger
from ledger.settings import Settings


def ledger_env(settings: Settings) -> dict[str, str]:
    """eventsourcing settings for the configured backend (creates the data dir)."""
    if settings.database_url:
        ensure_postgres_schema(settings.database_url)
        return postgres_env(settings.database_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return sqlite_env(settings.data_dir / "ledger.sqlite3")


def open_keystore(settings: Settings) -> KeyStore:
    """The PKCS#11 keystore for the settings (embedded SoftHSM2 token by default).

    Raises HsmError when the module, token or PIN is unusable.
    """
    from ledger.keystore.pkcs11_adapter import open_keystore as _open

    return _open(settings)


def open_ledger(
    settings: Settings, *, keystore: KeyStore | None = None, clock: Clock | None = None
) -> KeyLedger:
    """A ready KeyLedger. Opens the database and (unless given) the HSM.

    Raises HsmError, or the database driver's error when the database is unreachable.
    """
    env = ledger_env(settings)
    ks = keystore if keystore is not None else open_keystore(settings)
    return KeyLedger(settings=settings, keystore=ks, env=env, clock=clock)


__all__ = ["ledger_env", "open_keystore", "open_ledger"]
