"""Raw SoftHSM2 AES-GCM throughput through the PKCS#11 adapter: the HSM baseline.

``bench/encrypt.py`` prints the ledger's Encrypt throughput next to this figure.
Run: ``python -m bench.hsm_baseline`` (uses a throwaway embedded token).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ledger.keystore.port import KeyStore

PAYLOAD = b"\x5a" * 1024
AAD = b"bench"


def ops_per_second(op: Callable[[int], object], *, threads: int, seconds: float) -> float:
    """Calls of ``op(thread_index)`` per second, from ``threads`` threads started together."""
    counts = [0] * threads
    start_gate = threading.Barrier(threads + 1)
    deadline = 0.0

    def work(n: int) -> None:
        start_gate.wait()
        done = 0
        while time.perf_counter() < deadline:
            op(n)
            done += 1
        counts[n] = done

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    begin = time.perf_counter()
    deadline = begin + seconds
    start_gate.wait()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - begin)


def raw_softhsm_aes_gcm_ops(store: KeyStore, seconds: float = 2.0, threads: int = 1) -> float:
    """AES-GCM encryptions of 1 KiB per second through ``store``, on one pre-made key."""
    material = store.generate_symmetric_key()
    store.encrypt(material, PAYLOAD, AAD)  # unwrap and warm the session pool
    return ops_per_second(
        lambda _: store.encrypt(material, PAYLOAD, AAD), threads=threads, seconds=seconds
    )


def main() -> None:
    from ledger.keystore.pkcs11_adapter import open_keystore
    from ledger.settings import Settings

    seconds = float(os.environ.get("BENCH_SECONDS", "2"))
    with tempfile.TemporaryDirectory(prefix="keyledger-bench-") as tmp:
        store = open_keystore(Settings(data_dir=Path(tmp) / "data"))
        try:
            print(f"cpus: {os.cpu_count()}")
            for threads in (1, 8):
                ops = raw_softhsm_aes_gcm_ops(store, seconds=seconds, threads=threads)
                print(f"raw SoftHSM2 AES-GCM 1 KiB encrypt, {threads} thread(s): {ops:,.0f} ops/s")
        finally:
            store.close()


if __name__ == "__main__":
    main()
