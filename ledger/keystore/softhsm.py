"""The embedded default HSM: a SoftHSM2 token initialised in the data dir on first use.

Layout under the data dir (mode 0700)::

    softhsm/softhsm2.conf     tokendir, file backend, log level ERROR
    softhsm/tokens/           the token files (SoftHSM2 encrypts private objects with
                              a key derived from the user PIN)
    hsm.pin                   the user PIN, mode 0600

Security caveats:

* The user PIN sits next to the token, so the embedded token protects key material only
  as well as the data dir's file permissions do. Use an external PKCS#11 module (a real
  HSM) when that is not enough.
* The SO PIN is random and discarded after initialisation: the user PIN cannot be reset,
  only the whole token re-created (which destroys the domain wrapping key, and with it
  every wrapped key).
* PINs are passed to ``softhsm2-util`` on its command line, which other local users can
  read from ``/proc`` for the few milliseconds the command runs. They are never logged.

Process caveat: SoftHSM2 reads ``SOFTHSM2_CONF`` once, when the module is initialised
(``C_Initialize``). One process can therefore use only one SoftHSM2 conf, and with it one
token directory, for its whole life. :func:`ensure_embedded_token` sets
``SOFTHSM2_CONF``; it raises :class:`~ledger.errors.HsmError` if the PKCS#11 module was
already initialised in this process under a different conf.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ledger.errors import HsmError
from ledger.settings import DEFAULT_SOFTHSM_MODULE, DEFAULT_TOKEN_LABEL

SOFTHSM_UTIL = "softhsm2-util"
PIN_FILE = "hsm.pin"
_NOT_INSTALLED = "SoftHSM2 is not installed: apt-get install softhsm2"

_state_lock = threading.Lock()
# The SOFTHSM2_CONF value in force when this process initialised a PKCS#11 module
# (recorded by the adapter through ``note_module_initialised``); None until then.
_conf_at_init: str | None = None
_module_initialised = False


@dataclass(frozen=True)
class EmbeddedToken:
    """Where the embedded token lives and how to log in to it."""

    conf_path: Path
    module: str
    label: str
    pin: str = field(repr=False)


def note_module_initialised() -> None:
    """Record that a PKCS#11 module was initialised, under the current SOFTHSM2_CONF.

    Called by the PKCS#11 adapter right after its first ``C_Initialize`` in this process.
    """
    global _conf_at_init, _module_initialised
    with _state_lock:
        if not _module_initialised:
            _module_initialised = True
            _conf_at_init = os.environ.get("SOFTHSM2_CONF")


def ensure_embedded_token(data_dir: Path, label: str = DEFAULT_TOKEN_LABEL) -> EmbeddedToken:
    """Return the embedded SoftHSM2 token in ``data_dir``, initialising it on first use.

    Idempotent and safe against concurrent first use (threads and processes serialise
    on a lock file). Sets ``os.environ["SOFTHSM2_CONF"]`` for this process.

    Raises HsmError when SoftHSM2 is not installed, when the PKCS#11 module was already
    initialised in this process under a different SOFTHSM2_CONF, when ``softhsm2-util``
    fails, or when a token directory exists without its PIN file.
    """
    module = DEFAULT_SOFTHSM_MODULE
    util = shutil.which(SOFTHSM_UTIL)
    if util is None or not Path(module).exists():
        raise HsmError(_NOT_INSTALLED)

    data_dir = Path(data_dir).absolute()
    hsm_dir = data_dir / "softhsm"
    token_dir = hsm_dir / "tokens"
    conf_path = hsm_dir / "softhsm2.conf"
    pin_path = data_dir / PIN_FILE

    _claim_conf(conf_path)

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    hsm_dir.mkdir(mode=0o700, exist_ok=True)
    token_dir.mkdir(mode=0o700, exist_ok=True)

    with _process_lock(hsm_dir / ".init.lock"):
        if not conf_path.exists():
            _write_private(
                conf_path,
                f"directories.tokendir = {token_dir}\n"
                "objectstore.backend = file\n"
                "log.level = ERROR\n",
            )
        if pin_path.exists():
            pin = pin_path.read_text(encoding="ascii").strip()
            return EmbeddedToken(conf_path=conf_path, module=module, label=label, pin=pin)
        if any(token_dir.iterdir()):
            raise HsmError(
                f"{token_dir} holds a token but {pin_path} is missing; "
                "restore the PIN file or move the token directory away"
            )
        pin = secrets.token_hex(16)
        so_pin = secrets.token_hex(16)
        # The PIN is written before the token exists (then renamed), so a crash never
        # leaves a token whose PIN is lost.
        tmp_pin_path = pin_path.with_name(PIN_FILE + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp_pin_path.unlink()
        _write_private(tmp_pin_path, pin + "\n")
        env = {**os.environ, "SOFTHSM2_CONF": str(conf_path)}
        try:
            subprocess.run(
                [
                    util,
                    "--init-token",
                    "--free",
                    "--label",
                    label,
                    "--pin",
                    pin,
                    "--so-pin",
                    so_pin,
                ],
                env=env,
                check=True,
                capture_output=True,
                timeout=60,
            )
        except FileNotFoundError:
            raise HsmError(_NOT_INSTALLED) from None
        except subprocess.CalledProcessError as exc:
            # stderr of softhsm2-util does not echo PINs; keep only its first line.
            reason = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[:1]
            raise HsmError(f"softhsm2-util --init-token failed: {' '.join(reason)}") from None
        except subprocess.TimeoutExpired:
            raise HsmError("softhsm2-util --init-token timed out") from None
        os.replace(tmp_pin_path, pin_path)
        return EmbeddedToken(conf_path=conf_path, module=module, label=label, pin=pin)


def _claim_conf(conf_path: Path) -> None:
    """Point SOFTHSM2_CONF at ``conf_path`` unless the module already read another one."""
    with _state_lock:
        if _module_initialised and _conf_at_init != str(conf_path):
            raise HsmError(
                "the PKCS#11 module is already initialised in this process with "
                f"SOFTHSM2_CONF={_conf_at_init!r}; SoftHSM2 reads its conf once per "
                f"process, so {conf_path} cannot be used here (start a new process)"
            )
        os.environ["SOFTHSM2_CONF"] = str(conf_path)


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 from the start (never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _process_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
