"""GenerateDataKey and Encrypt throughput (durable events on SQLite) beside raw SoftHSM2
AES-GCM of the same size; Sign (ECDSA P-256, RSA-2048 PSS), Verify (ECDSA P-256) and
GenerateMac (HMAC_256) beside the same primitive through the keystore adapter (Verify:
``cryptography`` on the host, where KeyLedger verifies); and envelope-file MB/s beside
pure ``cryptography`` AES-GCM with the same chunking, all measured in the same run.

Run: ``python bench/crypto.py``. ``BENCH_SECONDS`` sets each ops/s measurement's length
(default 3: about 80 s in all). Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import load_der_public_key

from bench.hsm_baseline import ops_per_second
from ledger.bootstrap import open_ledger
from ledger.chain import verify_chain
from ledger.envelope_file import DEFAULT_CHUNK_SIZE, decrypt_file, encrypt_file
from ledger.keystore.port import KeyStore
from ledger.service import Caller, KeyLedger
from ledger.settings import Settings

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
AAD = b"bench"
STREAM_BYTES = 64 * 1024 * 1024
ENVELOPE_RUNS = 15
THREADS = (1, 8)
MESSAGE = b"\x3c" * 32  # Sign / Verify / GenerateMac message (RAW)
DIGEST = hashlib.sha256(MESSAGE).digest()
RAW_KEK = "keyledger-kek-bench-raw"  # KEK of the keys the raw baselines use


@dataclass(frozen=True)
class CryptoCase:
    """One asymmetric or HMAC row: the KMS call and its raw primitive."""

    op: str  # row label; its first word is the KMS operation
    key_spec: str
    key_usage: str
    algorithm: str  # signing or MAC algorithm
    primitive: str  # what the raw figure measures


CRYPTO_CASES = (
    CryptoCase(
        "Sign ECDSA P-256", "ECC_NIST_P256", "SIGN_VERIFY", "ECDSA_SHA_256",
        "SoftHSM2 CKM_ECDSA P-256 (keystore.sign)",
    ),
    CryptoCase(
        "Sign RSA-2048 PSS", "RSA_2048", "SIGN_VERIFY", "RSASSA_PSS_SHA_256",
        "SoftHSM2 CKM_RSA_PKCS_PSS 2048 (keystore.sign)",
    ),
    CryptoCase(
        "Verify ECDSA P-256", "ECC_NIST_P256", "SIGN_VERIFY", "ECDSA_SHA_256",
        "cryptography ECDSA P-256 verify (host, no HSM)",
    ),
    CryptoCase(
        "GenerateMac HMAC_256", "HMAC_256", "GENERATE_VERIFY_MAC", "HMAC_SHA_256",
        "SoftHSM2 CKM_SHA256_HMAC (keystore.generate_mac)",
    ),
)  # fmt: skip


class NullWriter(io.RawIOBase):
    """Discards what is written (the figure is the crypto, not a copy to memory)."""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


def raw_hsm_ops(store: KeyStore, size: int, threads: int, seconds: float) -> float:
    """AES-GCM encryptions of ``size`` bytes per second through the keystore."""
    material = store.generate_symmetric_key()
    payload = b"\x5a" * size
    store.encrypt(material, payload, AAD)  # unwrap and warm the session pool
    return ops_per_second(
        lambda _: store.encrypt(material, payload, AAD), threads=threads, seconds=seconds
    )


def raw_crypto_ops(store: KeyStore, case: CryptoCase, threads: int, seconds: float) -> float:
    """The raw primitive of ``case`` per second on a 32-byte message, one pre-made key."""
    call: Callable[[int], object]
    if case.key_usage == "GENERATE_VERIFY_MAC":
        mac_key = store.generate_hmac_key(case.key_spec, RAW_KEK)
        call = lambda _: store.generate_mac(mac_key, case.algorithm, MESSAGE)  # noqa: E731
    else:
        material, public_der = store.generate_key_pair(case.key_spec, RAW_KEK)
        if case.op.startswith("Verify"):
            signature = store.sign(material, case.algorithm, DIGEST)
            public = load_der_public_key(public_der)
            assert isinstance(public, ec.EllipticCurvePublicKey)
            algorithm = ec.ECDSA(hashes.SHA256())  # hashes the message, as Verify RAW does
            call = lambda _: public.verify(signature, MESSAGE, algorithm)  # noqa: E731
        else:
            call = lambda _: store.sign(material, case.algorithm, DIGEST)  # noqa: E731
    call(0)  # unwrap and warm the session pool
    return ops_per_second(call, threads=threads, seconds=seconds)


def ledger_crypto_ops(ledger: KeyLedger, case: CryptoCase, threads: int, seconds: float) -> float:
    """KMS calls of ``case`` per second (RAW 32-byte message), each a durable event."""
    key = ledger.create_key(caller=CALLER, key_spec=case.key_spec, key_usage=case.key_usage)[
        "KeyMetadata"
    ]["KeyId"]
    call: Callable[[int], object]
    if case.key_usage == "GENERATE_VERIFY_MAC":
        call = lambda _: ledger.generate_mac(  # noqa: E731
            caller=CALLER, key_id=key, message=MESSAGE, mac_algorithm=case.algorithm
        )
    elif case.op.startswith("Verify"):
        signature = ledger.sign(
            caller=CALLER, key_id=key, message=MESSAGE, signing_algorithm=case.algorithm
        )["Signature"]
        call = lambda _: ledger.verify(  # noqa: E731
            caller=CALLER,
            key_id=key,
            message=MESSAGE,
            signature=signature,
            signing_algorithm=case.algorithm,
        )
    else:
        call = lambda _: ledger.sign(  # noqa: E731
            caller=CALLER, key_id=key, message=MESSAGE, signing_algorithm=case.algorithm
        )
    call(0)  # warm caches
    return ops_per_second(call, threads=threads, seconds=seconds)


def ledger_ops(ledger: KeyLedger, op: str, threads: int, seconds: float) -> float:
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    payload = b"\xa5" * 1024
    calls: dict[str, Callable[[int], object]] = {
        "GenerateDataKey": lambda i: ledger.generate_data_key(
            caller=CALLER, key_id=key, key_spec="AES_256", encryption_context={"w": str(i)}
        ),
        "Encrypt": lambda i: ledger.encrypt(
            caller=CALLER, key_id=key, plaintext=payload, encryption_context={"w": str(i)}
        ),
    }
    calls[op](0)  # warm caches
    return ops_per_second(calls[op], threads=threads, seconds=seconds)


def mb_per_s(run: Callable[[], None]) -> float:
    """Median MB/s (10^6 bytes) of ``ENVELOPE_RUNS`` runs over STREAM_BYTES."""
    rates = []
    for _ in range(ENVELOPE_RUNS):
        start = time.perf_counter()
        run()
        rates.append(STREAM_BYTES / 1e6 / (time.perf_counter() - start))
    return statistics.median(rates)


def pure_aes_gcm_stream(data: bytes, chunk_size: int) -> None:
    """The envelope's bulk work without the service: same chunks, nonces and AAD."""
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    prefix, aad = os.urandom(7), os.urandom(32)
    src, dst = io.BytesIO(data), NullWriter()
    index = 0
    while True:
        block = src.read(chunk_size)
        final = len(block) < chunk_size
        dst.write(aead.encrypt(prefix + struct.pack(">IB", index, final), block, aad))
        index += 1
        if final:
            break


def main() -> None:
    from ledger.keystore.pkcs11_adapter import open_keystore

    seconds = float(os.environ.get("BENCH_SECONDS", "3"))
    data = os.urandom(STREAM_BYTES)
    rows: list[tuple[str, int, float, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="keyledger-bench-") as tmp:
        store: KeyStore = open_keystore(Settings(data_dir=Path(tmp) / "hsm"))
        try:
            print(f"cpus: {os.cpu_count()}, {seconds:g} s per ops/s figure")
            ledger = open_ledger(Settings(data_dir=Path(tmp) / "sqlite"), keystore=store)
            try:
                for op, size in (("GenerateDataKey", 32), ("Encrypt", 1024)):
                    for threads in THREADS:
                        raw = raw_hsm_ops(store, size, threads, seconds)
                        ops = ledger_ops(ledger, op, threads, seconds)
                        primitive = f"SoftHSM2 AES-GCM encrypt {'32 B' if size == 32 else '1 KiB'}"
                        rows.append((op, threads, ops, raw, primitive))
                for case in CRYPTO_CASES:
                    for threads in THREADS:
                        raw = raw_crypto_ops(store, case, threads, seconds)
                        ops = ledger_crypto_ops(ledger, case, threads, seconds)
                        rows.append((case.op, threads, ops, raw, case.primitive))
                key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
                sealed = io.BytesIO()

                def envelope_encrypt() -> None:
                    sealed.seek(0)
                    sealed.truncate()
                    encrypt_file(
                        ledger, caller=CALLER, key_id=key, src=io.BytesIO(data), dst=sealed
                    )

                def envelope_encrypt_to_null() -> None:
                    encrypt_file(
                        ledger,
                        caller=CALLER,
                        key_id=key,
                        src=io.BytesIO(data),
                        dst=NullWriter(),  # type: ignore[arg-type]
                    )

                envelope_encrypt()
                blob = sealed.getvalue()
                enc_rate = mb_per_s(envelope_encrypt_to_null)
                dec_rate = mb_per_s(
                    lambda: decrypt_file(
                        ledger,
                        caller=CALLER,
                        src=io.BytesIO(blob),
                        dst=NullWriter(),  # type: ignore[arg-type]
                    )
                )
                pure_rate = mb_per_s(lambda: pure_aes_gcm_stream(data, DEFAULT_CHUNK_SIZE))
                n = verify_chain(ledger.db.iter_chain(), ledger.db.iter_events()).count
                print(f"SQLite (WAL, synchronous=FULL): chain verified over {n} events")
            finally:
                ledger.close()
        finally:
            store.close()

    print()
    print(f"{'operation (SQLite, durable)':<30}{'conc':>5}{'ops/s':>10}{'raw HSM ops/s':>15}"
          f"{'ratio':>8}  raw primitive")  # fmt: skip
    for op, threads, ops, raw, primitive in rows:
        print(f"{op:<30}{threads:>5}{ops:>10,.0f}{raw:>15,.0f}{ops / raw:>8.3f}  {primitive}")
    chunk = DEFAULT_CHUNK_SIZE // 1024
    print()
    print(f"envelope files, 64 MiB in memory, {chunk} KiB chunks (median of {ENVELOPE_RUNS}):")
    print(f"  envelope encrypt   {enc_rate:>9,.0f} MB/s  (incl. one GenerateDataKey)")
    print(f"  envelope decrypt   {dec_rate:>9,.0f} MB/s  (incl. one Decrypt)")
    print(f"  pure AES-GCM       {pure_rate:>9,.0f} MB/s  (cryptography, same chunking)")
    print(f"  ratio encrypt/pure {enc_rate / pure_rate:>9.3f}")


if __name__ == "__main__":
    main()
