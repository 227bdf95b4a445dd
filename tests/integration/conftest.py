"""Shared integration fixtures.

SoftHSM2 reads SOFTHSM2_CONF once per process, so the whole test session shares one
embedded token: use ``softhsm_settings`` (or ``softhsm_keystore``) rather than creating
tokens in per-test temp dirs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.bootstrap import open_ledger
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore, open_keystore
from ledger.keystore.softhsm import ensure_embedded_token
from ledger.service import KeyLedger
from ledger.settings import Settings


@pytest.fixture(scope="session")
def softhsm_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings whose data dir holds the session's embedded SoftHSM2 token."""
    data_dir = tmp_path_factory.mktemp("keyledger-hsm") / "data"
    ensure_embedded_token(data_dir)
    return Settings(data_dir=data_dir)


@pytest.fixture(scope="session")
def softhsm_keystore(softhsm_settings: Settings) -> Iterator[Pkcs11KeyStore]:
    """One Pkcs11KeyStore on the session token; safe to share between ledgers and threads."""
    store = open_keystore(softhsm_settings)
    yield store
    store.close()


# ---------------------------------------------------------------- ledgers on both backends

PG_BASE_URL = os.environ.get(
    "KEYLEDGER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _pg_unavailable(exc: BaseException) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL at {PG_BASE_URL} is required under CI: {exc}")
    pytest.skip(f"PostgreSQL unavailable: {exc}")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL naming a fresh PostgreSQL schema, dropped after the test."""
    import uuid

    import psycopg

    schema = "kl_test_" + uuid.uuid4().hex[:12]
    try:
        conn = psycopg.connect(PG_BASE_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        _pg_unavailable(exc)
    with conn:
        yield f"{PG_BASE_URL}?schema={schema}"
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for a fresh ledger on SQLite (temp dir) or PostgreSQL (fresh schema)."""
    data_dir = tmp_path / "data"
    if request.param == "sqlite":
        return Settings(data_dir=data_dir)
    return Settings(data_dir=data_dir, database_url=request.getfixturevalue("pg_url"))


@pytest.fixture
def ledger(ledger_settings: Settings, softhsm_keystore: Pkcs11KeyStore) -> Iterator[KeyLedger]:
    """A fresh KeyLedger on the session's SoftHSM2 token, on each backend."""
    app = open_ledger(ledger_settings, keystore=softhsm_keystore)
    yield app
    app.close()
