"""Helpers every command group shares: the context, output, and option parsing.

Parsers raise ``ValidationError``; ``cli.main.main`` turns it into the one error line.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from cli.context import CliContext
from ledger.errors import KeyLedgerError, ValidationError

if TYPE_CHECKING:
    from projections.state import LedgerState

JSON = dict[str, Any]

KeyArg = Annotated[str, typer.Argument(help="Key id or key ARN.")]
LimitOpt = Annotated[int | None, typer.Option(help="Page size (AWS Limit).")]
MarkerOpt = Annotated[str | None, typer.Option(help="NextMarker of a previous page.")]
AsOfOpt = Annotated[
    str | None,
    typer.Option(
        "--as-of", help="Replay the log up to this RFC 3339 time, e.g. 2026-05-01T00:00:00Z."
    ),
]
AtSeqOpt = Annotated[
    int | None, typer.Option("--at-seq", min=0, help="Replay the log up to this record seq.")
]


def ctx_of(ctx: typer.Context) -> CliContext:
    obj = ctx.find_root().obj
    assert isinstance(obj, CliContext)
    return obj


def jsonable(value: Any) -> Any:
    """AWS JSON wire form: blobs base64-encoded."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def emit(cli: CliContext, response: JSON, text: str) -> None:
    """The AWS response with ``--json``, else ``text``."""
    if cli.json_output:
        typer.echo(orjson.dumps(jsonable(response), option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(text)


def emit_list(cli: CliContext, response: JSON, field: str, line: Callable[[Any], str]) -> None:
    """A list response: the AWS JSON, or one line per item (and, when the page is
    truncated, ``next marker: M`` on stderr so stdout stays one item per line)."""
    if cli.json_output:
        emit(cli, response, "")
        return
    for item in response[field]:
        typer.echo(line(item))
    if response.get("Truncated"):
        typer.echo(f"next marker: {response['NextMarker']}", err=True)


def fmt_time(epoch: float | None) -> str:
    """Epoch seconds (AWS wire form) as RFC 3339 UTC."""
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat().replace("+00:00", "Z")


def parse_pairs(pairs: Iterable[str] | None, what: str) -> dict[str, str]:
    """``k=v`` entries to a dict; the value may be empty or hold ``=``.

    Raises ValidationError for an entry without ``=``, an empty key, or a key given twice.
    """
    out: dict[str, str] = {}
    for pair in pairs or []:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise ValidationError(
                f"{what} entries must be given as key=value with a non-empty key."
            )
        if k in out:
            raise ValidationError(f"{what} key '{k}' is given twice.")
        out[k] = v
    return out


def parse_time(text: str, option: str = "--as-of") -> datetime:
    """An RFC 3339 date-time with ``Z`` or an offset; raises ValidationError otherwise."""
    try:
        if "T" not in text.upper():
            raise ValueError(text)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(
            f"{option} must be an RFC 3339 time such as 2026-05-01T00:00:00Z, not '{text}'."
        ) from None
    if value.tzinfo is None:
        raise ValidationError(f"{option} needs a time zone ('Z' or an offset such as +02:00).")
    return value.astimezone(UTC)


def point_in_time(cli: CliContext, as_of: str | None, at_seq: int | None) -> LedgerState | None:
    """The replayed state for ``--as-of``/``--at-seq``; None when neither is given."""
    if as_of is not None and at_seq is not None:
        raise ValidationError("Give --as-of or --at-seq, not both.")
    if as_of is None and at_seq is None:
        return None
    from projections.catalog import state_at

    time = parse_time(as_of) if as_of is not None else None
    return state_at(cli.ledger_without_hsm.db, seq=at_seq, time=time)


def read_text_file(path: str) -> str:
    """A UTF-8 text file, or stdin for ``-`` (OSError reaches the boundary in main)."""
    if path == "-":
        import sys

        return sys.stdin.read()
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValidationError(f"{path} is not UTF-8 text.") from None


@contextmanager
def recorded_failure(cli: CliContext, operation: str, request: JSON) -> Iterator[None]:
    """Record a failure of a read answered by the catalog in the ledger (every failed
    attempt is recorded, as for the service's own operations), then re-raise it."""
    try:
        yield
    except KeyLedgerError as err:
        given = {k: v for k, v in request.items() if v is not None}
        cli.ledger_without_hsm.record_rejected(
            operation=operation, caller=cli.caller, request=given, error=err
        )
        raise


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by Ctrl-C or SIGTERM while the block runs (in the main thread;
    elsewhere nothing is installed), so a consumer loop stops cleanly; the previous
    handlers come back afterwards.

    The handler only writes a byte to a pipe and a watcher thread sets the event:
    ``Event.set()`` inside a handler can deadlock, because the handler runs in the main
    thread between bytecodes, possibly while that thread holds the event's own lock
    inside ``Event.wait()``.
    """
    import os
    import signal

    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def on_signal(*_: object) -> None:
        with suppress(OSError):  # pipe full: a stop is already pending
            os.write(write_fd, b"\0")

    def watch() -> None:
        if os.read(read_fd, 1):  # b"" once the block has ended
            stop.set()

    watcher = threading.Thread(target=watch, name="stop-on-signal", daemon=True)
    watcher.start()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        os.close(write_fd)
        watcher.join()
        os.close(read_fd)
