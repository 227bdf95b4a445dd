"""HTTP API throughput: Encrypt, Decrypt and GenerateDataKey through boto3 against
``keyledger serve`` (SigV4 verified, a durable event per call) and against moto's
server, measured the same way in the same run.

Run: ``make bench`` or ``python bench/api.py [--seconds 5] [--concurrency 1,16]
[--workers 1,2] [--ops Encrypt,Decrypt,GenerateDataKey] [--client-procs 2]
[--postgres URL]``.

Both servers are subprocesses on 127.0.0.1 (free ports). KeyLedger gets a fresh data
dir (its own SoftHSM token, SQLite in WAL with synchronous=FULL; or PostgreSQL in a
throwaway schema with ``--postgres``) and a principal ``bench`` whose identity policy
allows ``kms:*``, made with the ``keyledger`` CLI as an admin would. The concurrency is
spread over ``--client-procs`` forked load-generating processes: one Python process of
16 boto3 threads tops out near 1,200 calls/s against a server that answers instantly,
two processes of 8 near 3,000. Each thread has its own boto3 client, made and warmed
before the clock starts; retries are off, so a throttle or a 503 counts as an error,
not as a slow success. Same payloads on both sides: 1 KiB plaintext, GenerateDataKey
AES_256, Decrypt of one blob made beforehand.

Plain boto3 clients, as applications use them: KeyLedger accepts a signature once, but
tells two identical calls signed in the same second apart by the unsigned per-call
``amz-sdk-invocation-id`` botocore adds (``api.sigv4.ReplayCache``), so the same
Decrypt in a loop is answered every time, as AWS answers it.

Each cell is measured KeyLedger then moto, one right after the other (moto again for
every ``--workers`` value), so both see the same machine load; the ratio is the figure
to read on a shared machine. The load generator (boto3) runs on the same cores as the
servers: its CPU per call (all its processes) is printed beside the server's (the
server's process tree; PostgreSQL's own processes are not counted), so a ratio capped
by the client shows.
Prints; asserts nothing. Subprocesses and temp dirs are removed on exit, Ctrl-C and
SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

PAYLOAD = b"\xa5" * 1024
REGION = "us-east-1"
OPS = ("Encrypt", "Decrypt", "GenerateDataKey")
#: Also measurable with --ops: a read, recorded (one read-only record per call) since
#: successful reads are on the record.
EXTRA_OPS = ("DescribeKey",)
TARGET_RATIO = 3.0
TARGET_CONCURRENCY = 16
WARMUP_CALLS = 3
ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
}
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Cell:
    """One measurement: calls per second, latency percentiles, CPU per call."""

    ops: float
    p50_ms: float
    p99_ms: float
    errors: int
    first_error: str | None
    server_cpu_ms: float | None  # server process tree CPU per successful call
    client_cpu_ms: float  # the client processes' CPU per successful call (boto3)


@dataclass
class Target:
    """A running KMS endpoint: its URL, credentials and the key the bench uses."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    access_key: str
    secret: str
    key_id: str = ""
    blob: bytes = b""

    def client(self) -> Any:
        kms = boto3.client(
            "kms",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret,
            config=Config(retries={"max_attempts": 1}),
        )
        return kms

    def prepare(self) -> None:
        """One symmetric key and one ciphertext blob of ``PAYLOAD``, made beforehand."""
        kms = self.client()
        self.key_id = kms.create_key(Description="bench")["KeyMetadata"]["KeyId"]
        self.blob = kms.encrypt(KeyId=self.key_id, Plaintext=PAYLOAD)["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=self.blob)["Plaintext"] == PAYLOAD


def call_for(op: str, target: Target) -> Callable[[Any], object]:
    key, blob = target.key_id, target.blob
    if op == "Encrypt":
        return lambda kms: kms.encrypt(KeyId=key, Plaintext=PAYLOAD)
    if op == "Decrypt":
        return lambda kms: kms.decrypt(CiphertextBlob=blob, KeyId=key)
    if op == "GenerateDataKey":
        return lambda kms: kms.generate_data_key(KeyId=key, KeySpec="AES_256")
    if op == "DescribeKey":
        return lambda kms: kms.describe_key(KeyId=key)
    raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS + EXTRA_OPS)}")


# --- measurement -----------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float | None:
    """user+system CPU seconds of ``pid`` and its descendants (Linux /proc), or None."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    try:
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                stat = Path(f"/proc/{p}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += (int(fields[11]) + int(fields[12])) / tick
                for task in Path(f"/proc/{p}/task").iterdir():
                    kids = (task / "children").read_text().split()
                    todo.extend(int(k) for k in kids)
    except OSError:
        return None
    return total


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def _client_process(
    target: Target,
    op: str,
    threads: int,
    seconds: float,
    gate: Any,
    results: Any,
) -> None:
    """One load-generating process: ``threads`` threads, one warmed boto3 client each,
    released together by ``gate`` (shared with the other processes and the parent).
    Sends back its latencies, errors and its own CPU seconds over the run."""
    call = call_for(op, target)
    clients = [target.client() for _ in range(threads)]
    for kms in clients:
        for _ in range(WARMUP_CALLS):
            call(kms)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    first_error: list[str] = []
    local = threading.Barrier(threads + 1)
    deadline = 0.0

    def work(n: int) -> None:
        kms, lat = clients[n], latencies[n]
        clock = time.perf_counter
        local.wait()
        while (t0 := clock()) < deadline:
            try:
                call(kms)
            except Exception as exc:  # counted and reported, never retried
                errors[n] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {str(exc)[:160]}")
                continue
            lat.append(clock() - t0)

    workers = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(threads)]
    for w in workers:
        w.start()
    gate.wait()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.perf_counter() + seconds
    local.wait()
    for w in workers:
        w.join()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for kms in clients:
        kms.close()
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    done = [x for lat in latencies for x in lat]
    results.put((done, sum(errors), first_error[0] if first_error else None, cpu))


def measure(target: Target, op: str, concurrency: int, seconds: float, procs: int) -> Cell:
    """``op`` from ``concurrency`` threads spread over ``procs`` client processes (one
    warmed boto3 client per thread) for ``seconds``.

    Several processes, because one Python process of boto3 clients is itself a
    bottleneck: 16 threads in one process reached about 1,170 calls/s against a server
    that answers instantly, 2 processes of 8 about 3,000 (the GIL, not the cores)."""
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    ctx = multiprocessing.get_context("fork")  # children inherit the target, no pickling
    gate = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    children = [
        ctx.Process(
            target=_client_process, args=(target, op, n, seconds, gate, results), daemon=True
        )
        for n in shares
    ]
    for child in children:
        child.start()
    try:
        gate.wait(timeout=120)
        server0 = tree_cpu_seconds(target.proc.pid)
        begin = time.perf_counter()
        got = [results.get(timeout=seconds + 120) for _ in children]
        elapsed = time.perf_counter() - begin
        server1 = tree_cpu_seconds(target.proc.pid)
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    done = sorted(x for lat, _, _, _ in got for x in lat)
    errors = sum(e for _, e, _, _ in got)
    first_error = next((f for _, _, f, _ in got if f), None)
    client_s = sum(cpu for _, _, _, cpu in got)
    n = max(len(done), 1)
    server_ms = None if server0 is None or server1 is None else (server1 - server0) * 1000 / n
    return Cell(
        ops=len(done) / elapsed,
        p50_ms=percentile(done, 0.50) * 1000,
        p99_ms=percentile(done, 0.99) * 1000,
        errors=errors,
        first_error=first_error,
        server_cpu_ms=server_ms,
        client_cpu_ms=client_s * 1000 / n,
    )


# --- servers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keyledger_bin() -> str:
    exe = BIN / "keyledger"
    return str(exe) if exe.exists() else "keyledger"


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A server subprocess in its own session (so Ctrl-C reaches only this script,
    which then stops it), output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it started it: uvicorn's workers too), then
    SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Until ``url`` answers at all (any HTTP status); fails if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):  # loopback only
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


def keyledger_env(data_dir: Path, database_url: str | None) -> dict[str, str]:
    env = {**os.environ, "KEYLEDGER_DATA_DIR": str(data_dir)}
    env.pop("KEYLEDGER_DATABASE_URL", None)
    if database_url:
        env["KEYLEDGER_DATABASE_URL"] = database_url
    return env


def keyledger_cli(env: dict[str, str], data_dir: Path, *args: str, stdin: str = "") -> str:
    proc = subprocess.run(
        [keyledger_bin(), "--data-dir", str(data_dir), *args],
        input=stdin.encode(),
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"keyledger {' '.join(args)}: {proc.stderr.decode()[-2000:]}")
    return proc.stdout.decode()


def bench_principal(env: dict[str, str], data_dir: Path) -> dict[str, Any]:
    """Principal ``bench`` with an identity policy allowing kms:* (its access key)."""
    out = keyledger_cli(env, data_dir, "--json", "principals", "create", "bench")
    created: dict[str, Any] = json.loads(out)
    keyledger_cli(
        env,
        data_dir,
        "principals",
        "attach-policy",
        "bench",
        "--policy-name",
        "main",
        "--policy",
        "-",
        stdin=json.dumps(ALLOW_ALL),
    )
    return created


@contextlib.contextmanager
def keyledger_server(
    tmp: Path, creds: dict[str, Any], env: dict[str, str], data_dir: Path, workers: int
) -> Iterator[Target]:
    port = free_port()
    log = tmp / f"keyledger-w{workers}.log"
    argv = [keyledger_bin(), "--data-dir", str(data_dir), "serve", "--port", str(port)]
    proc = spawn([*argv, "--workers", str(workers)], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, log)
        yield Target(
            f"keyledger w{workers}", url, proc, creds["AccessKeyId"], creds["SecretAccessKey"]
        )
    finally:
        stop(proc)


@contextlib.contextmanager
def moto_server(tmp: Path) -> Iterator[Target]:
    port = free_port()
    log = tmp / "moto.log"
    exe = BIN / "moto_server"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = spawn([*argv, "-H", "127.0.0.1", "-p", str(port)], dict(os.environ), log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/", proc, log)
        yield Target("moto", url, proc, "AKIDBENCHMOTO0000000", "bench-secret-" + "x" * 27)
    finally:
        stop(proc)


def postgres_schema_url(base: str) -> tuple[str, Callable[[], None]]:
    """A throwaway schema's URL on ``base`` and the function that drops it."""
    import psycopg

    schema = "kl_apibench_" + uuid.uuid4().hex[:8]
    psycopg.connect(base, connect_timeout=5).close()

    def drop() -> None:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema={schema}", drop


# --- report ----------------------------------------------------------------------------


def fmt_cpu(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def print_table(
    results: dict[tuple[str, int, int], Cell],
    moto: dict[tuple[str, int, int], Cell],
    ops: list[str],
    concurrency: list[int],
    workers: list[int],
    backend: str,
) -> None:
    print()
    print(f"KeyLedger ({backend}) vs moto, ops/s over HTTP (boto3, SigV4), 1 KiB payloads")
    head = (
        f"{'op':<16}{'conc':>5}{'wrk':>4}{'keyledger ops/s':>17}{'moto ops/s':>12}"
        f"{'ratio':>7}   {'kl p50/p99 ms':>15}{'moto p50/p99 ms':>17}"
        f"   {'kl srv/cli cpu ms':>18}{'moto srv/cli':>14}"
    )
    print(head)
    print("-" * len(head))
    for op in ops:
        for c in concurrency:
            for w in workers:
                k, m = results[(op, c, w)], moto[(op, c, w)]
                ratio = k.ops / m.ops if m.ops else float("inf")
                print(
                    f"{op:<16}{c:>5}{w:>4}{k.ops:>17,.0f}{m.ops:>12,.0f}{ratio:>7.2f}   "
                    f"{f'{k.p50_ms:.1f}/{k.p99_ms:.1f}':>15}"
                    f"{f'{m.p50_ms:.1f}/{m.p99_ms:.1f}':>17}   "
                    f"{f'{fmt_cpu(k.server_cpu_ms)}/{k.client_cpu_ms:.2f}':>18}"
                    f"{f'{fmt_cpu(m.server_cpu_ms)}/{m.client_cpu_ms:.2f}':>14}"
                )
    for (op, c, w), cell in results.items():
        if cell.errors:
            print(f"errors: keyledger {op} c={c} w={w}: {cell.errors} ({cell.first_error})")
    for (op, c, w), cell in moto.items():
        if cell.errors:
            print(f"errors: moto {op} c={c} (beside w={w}): {cell.errors} ({cell.first_error})")
    if TARGET_CONCURRENCY not in concurrency:
        print(
            f"\ntarget: >= {TARGET_RATIO:g}x moto at concurrency {TARGET_CONCURRENCY}: "
            "not measured (add it to --concurrency)"
        )
        return
    if not any(op in OPS for op in ops):
        return
    for w in workers:
        verdicts = []
        for op in (o for o in ops if o in OPS):  # the target names these three
            k, m = results[(op, TARGET_CONCURRENCY, w)], moto[(op, TARGET_CONCURRENCY, w)]
            ratio = k.ops / m.ops if m.ops else float("inf")
            verdicts.append(f"{op} {'met' if ratio >= TARGET_RATIO else 'NOT MET'} ({ratio:.2f}x)")
        print(
            f"target: >= {TARGET_RATIO:g}x moto at concurrency {TARGET_CONCURRENCY} "
            f"(workers {w}): " + ", ".join(verdicts)
        )


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--concurrency", type=int_list, default=[1, 16], help="e.g. 1,16")
    parser.add_argument(
        "--workers",
        type=int_list,
        default=[1],
        help="keyledger serve --workers; a list (1,2) measures each",
    )
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated KMS operations")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=2,
        help="load-generating processes the concurrency is spread over (default 2)",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=None,
        help="run KeyLedger on PostgreSQL (throwaway schema) instead of SQLite",
    )
    args = parser.parse_args()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in ops:
        if op not in OPS + EXTRA_OPS:
            raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS + EXTRA_OPS)}")

    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="keyledger-apibench-")))
        database_url = None
        backend = "SQLite WAL, synchronous=FULL"
        if args.postgres:
            database_url, drop = postgres_schema_url(args.postgres)
            stack.callback(drop)
            backend = "PostgreSQL"
        data_dir = tmp / "data"
        env = keyledger_env(data_dir, database_url)
        creds = bench_principal(env, data_dir)
        moto = stack.enter_context(moto_server(tmp))
        moto.prepare()
        print(
            f"cpus: {os.cpu_count()}, {args.seconds:g} s per figure, backend: {backend}, "
            f"client processes: up to {args.client_procs}"
        )
        results: dict[tuple[str, int, int], Cell] = {}
        moto_cells: dict[tuple[str, int, int], Cell] = {}
        for workers in args.workers:
            with keyledger_server(tmp, creds, env, data_dir, workers) as kl:
                kl.prepare()
                for op in ops:
                    for c in args.concurrency:
                        results[(op, c, workers)] = k = measure(
                            kl, op, c, args.seconds, args.client_procs
                        )
                        # moto right after, so that the ratio compares like with like
                        moto_cells[(op, c, workers)] = m = measure(
                            moto, op, c, args.seconds, args.client_procs
                        )
                        print(
                            f"  {op} c={c} w={workers}: keyledger {k.ops:,.0f} ops/s, "
                            f"moto {m.ops:,.0f} ops/s",
                            flush=True,
                        )
        print_table(results, moto_cells, ops, args.concurrency, args.workers, backend)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; servers stopped, temp dir removed", file=sys.stderr)
        sys.exit(130)
