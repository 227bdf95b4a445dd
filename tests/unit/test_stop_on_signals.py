"""``stop_on_signals``: Ctrl-C and SIGTERM stop a consumer loop, never deadlock it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cli.common import stop_on_signals

ROOT = Path(__file__).resolve().parents[2]

# The signal lands while the main thread holds the event's lock, as it does for a few
# bytecodes inside every Event.wait(): a handler that called stop.set() itself would
# block on that lock forever.
SCRIPT = """
import os, signal
from cli.common import stop_on_signals
with stop_on_signals() as stop:
    with stop._cond:
        os.kill(os.getpid(), signal.{sig})
        for _ in range(10_000):
            pass
    print("set" if stop.wait(10) else "not set", flush=True)
print("handler restored:", signal.getsignal(signal.{sig}) is {default})
"""


@pytest.mark.parametrize(
    ("sig", "default"), [("SIGTERM", "signal.SIG_DFL"), ("SIGINT", "signal.default_int_handler")]
)
def test_a_signal_inside_the_events_lock_stops_without_deadlock(sig: str, default: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(sig=sig, default=default)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["set", "handler restored: True"]


def test_without_a_signal_the_event_stays_clear_and_the_block_ends() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert signal.getsignal(signal.SIGTERM) is not before
        assert not stop.wait(0.05)
    assert signal.getsignal(signal.SIGTERM) is before
    assert not stop.is_set()
    assert not [t for t in threading.enumerate() if t.name == "stop-on-signal"]


def test_outside_the_main_thread_nothing_is_installed() -> None:
    seen: list[object] = []

    def run() -> None:
        with stop_on_signals() as stop:
            seen.append(signal.getsignal(signal.SIGTERM))
            seen.append(stop.is_set())

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [before, False]
