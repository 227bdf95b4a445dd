"""Encrypt throughput (1 KiB plaintext, durable event) at concurrency 1 and 8, on SQLite
and on PostgreSQL, beside raw SoftHSM2 AES-GCM measured in the same run.

Run: ``make bench`` or ``python bench/encrypt.py`` (PostgreSQL from
``KEYLEDGER_BENCH_POSTGRES``, default ``postgresql://postgres@127.0.0.1:5432/postgres``;
a throwaway schema is created and dropped). ``BENCH_SECONDS`` sets each measurement's
length (default 5). Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hsm_baseline import ops_per_second, raw_softhsm_aes_gcm_ops
from ledger.bootstrap import open_ledger
from ledger.chain import verify_chain
from ledger.keystore.port import KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings

PAYLOAD = b"\xa5" * 1024
CALLER = Caller(principal="arn:aws:iam::111122223333:root")
TARGET_SQLITE_8 = 1000.0


def encrypt_ops(ledger: KeyLedger, threads: int, seconds: float) -> float:
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    ledger.encrypt(caller=CALLER, key_id=key, plaintext=PAYLOAD)  # warm caches
    return ops_per_second(
        lambda i: ledger.encrypt(
            caller=CALLER, key_id=key, plaintext=PAYLOAD, encryption_context={"w": str(i)}
        ),
        threads=threads,
        seconds=seconds,
    )


def pg_url() -> tuple[str, str] | None:
    base = os.environ.get(
        "KEYLEDGER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    try:
        import psycopg

        psycopg.connect(base, connect_timeout=3).close()
    except Exception as exc:
        print(f"PostgreSQL unavailable at {base}: {type(exc).__name__}; skipping it")
        return None
    schema = "kl_bench_" + uuid.uuid4().hex[:8]
    return base, schema


def drop_schema(base: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main() -> None:
    from ledger.keystore.pkcs11_adapter import open_keystore

    seconds = float(os.environ.get("BENCH_SECONDS", "5"))
    with tempfile.TemporaryDirectory(prefix="keyledger-bench-") as tmp:
        store: KeyStore = open_keystore(Settings(data_dir=Path(tmp) / "hsm"))
        try:
            print(f"cpus: {os.cpu_count()}, {seconds:g} s per figure, 1 KiB plaintext")
            raw = {t: raw_softhsm_aes_gcm_ops(store, seconds=seconds, threads=t) for t in (1, 8)}
            rows: list[tuple[str, int, float]] = []
            backends: list[tuple[str, Settings]] = [
                ("SQLite (WAL, synchronous=FULL)", Settings(data_dir=Path(tmp) / "sqlite"))
            ]
            pg = pg_url()
            if pg:
                url = f"{pg[0]}?schema={pg[1]}"
                backends.append(
                    ("PostgreSQL", Settings(data_dir=Path(tmp) / "pg", database_url=url))
                )
            try:
                for name, settings in backends:
                    ledger = open_ledger(settings, keystore=store)
                    for threads in (1, 8):
                        rows.append((name, threads, encrypt_ops(ledger, threads, seconds)))
                    n = verify_chain(ledger.db.iter_chain(), ledger.db.iter_events()).count
                    print(f"{name}: chain verified over {n} events")
                    ledger.close()
            finally:
                if pg:
                    drop_schema(*pg)
        finally:
            store.close()
    print()
    print(f"{'backend':<32}{'conc':>5}{'Encrypt ops/s':>15}{'raw HSM ops/s':>15}{'ratio':>8}")
    for name, threads, ops in rows:
        print(
            f"{name:<32}{threads:>5}{ops:>15,.0f}{raw[threads]:>15,.0f}{ops / raw[threads]:>8.3f}"
        )
    sqlite8 = next(ops for name, t, ops in rows if name.startswith("SQLite") and t == 8)
    verdict = "meets" if sqlite8 >= TARGET_SQLITE_8 else "MISSES"
    print(
        f"\ntarget: >= {TARGET_SQLITE_8:,.0f} ops/s on SQLite at concurrency 8: "
        f"{verdict} ({sqlite8:,.0f})"
    )


if __name__ == "__main__":
    main()
