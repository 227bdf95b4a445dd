"""Threads and processes writing one ledger keep a single linear, verifiable chain."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ledger.bootstrap import open_ledger
from ledger.chain import verify_chain
from ledger.keystore.pkcs11_adapter import Pkcs11KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
SECONDS = float(os.environ.get("KEYLEDGER_CONCURRENCY_SECONDS", "10"))


def test_eight_threads_encrypting_and_decrypting_for_ten_seconds(ledger: KeyLedger) -> None:
    keys = [ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"] for _ in range(3)]
    errors: list[BaseException] = []
    done = [0] * 8
    stop = time.monotonic() + SECONDS

    def work(i: int) -> None:
        try:
            n = 0
            while time.monotonic() < stop:
                key = keys[n % len(keys)]
                plaintext = f"thread {i} message {n}".encode() * 10
                ctx = {"thread": str(i)}
                blob = ledger.encrypt(
                    caller=CALLER, key_id=key, plaintext=plaintext, encryption_context=ctx
                )["CiphertextBlob"]
                out = ledger.decrypt(caller=CALLER, ciphertext_blob=blob, encryption_context=ctx)
                assert out["Plaintext"] == plaintext
                n += 1
            done[i] = n
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(n > 0 for n in done)
    result = verify_chain(ledger.db.iter_chain(), ledger.db.iter_events())
    assert result.count == 3 + 2 * sum(done)


WRITER = """
import sys
from pathlib import Path
from ledger.bootstrap import open_ledger
from ledger.service import Caller
from ledger.settings import Settings
data_dir, url, key, n, who = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
app = open_ledger(Settings(data_dir=Path(data_dir), database_url=url))
caller = Caller(principal="arn:aws:iam::111122223333:root", user_agent=who)
for i in range(n):
    app.encrypt(caller=caller, key_id=key, plaintext=b"p%d" % i)
app.keystore.close()
app.close()
"""


@pytest.mark.postgres
def test_two_processes_writing_one_postgres_ledger_keep_a_single_linear_chain(
    pg_url: str, softhsm_settings: Settings, softhsm_keystore: Pkcs11KeyStore, tmp_path: Path
) -> None:
    settings = Settings(data_dir=softhsm_settings.data_dir, database_url=pg_url)
    ledger = open_ledger(settings, keystore=softhsm_keystore)
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    n = 300
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(settings.data_dir), pg_url, key, str(n), f"proc{i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    result = verify_chain(ledger.db.iter_chain(), ledger.db.iter_events())
    assert result.count == 1 + 2 * n
    agents = [r.event()["call"]["user_agent"] for r in ledger.db.read_records(1, 10_000)]
    assert sorted(set(agents)) == [f"proc{i}" for i in (0, 1)]
    assert all(agents.count(a) == n for a in set(agents))
    with ledger.db.transaction(commit=False) as c:
        seqs = [int(r["seq"]) for r in c.execute("SELECT seq FROM {chain} ORDER BY seq").fetchall()]
    assert seqs == list(range(1, 2 * n + 2))
    ledger.close()
