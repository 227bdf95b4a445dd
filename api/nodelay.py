"""uvicorn HTTP protocols with TCP_NODELAY on every accepted connection and a hard
limit on the size of a request's head (request line and headers).

With ``--workers`` uvicorn hands the workers a pre-bound socket whose protocol number
is 0, so asyncio does not set TCP_NODELAY on accepted connections and small responses
wait for Nagle's algorithm and delayed ACKs (about 40 ms each; uvicorn issue #3149).

``FastHttpProtocol`` (httptools, the C parser) is preferred: it costs about 10% less
CPU per request than h11. httptools has no head-size limit of its own, so one is
enforced here: a head still incomplete after ``MAX_HEAD_BYTES`` bytes gets 400 and the
connection is closed, before more is buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 16 * 1024


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelayH11Protocol(H11Protocol):
    """h11 (head size limited through ``h11_max_incomplete_event_size``)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)
        super().connection_made(transport)  # type: ignore[arg-type]


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: h11 only
    FastHttpProtocol: Any = None
else:

    class _FastHttpProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            _nodelay(transport)
            self._in_head = True
            self._head_bytes = 0
            super().connection_made(transport)  # type: ignore[arg-type]

        def on_message_begin(self) -> None:
            self._in_head = True
            self._head_bytes = 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if (
                self._in_head
                and self._head_bytes > MAX_HEAD_BYTES
                and not self.transport.is_closing()
            ):
                self.send_400_response("Request head too large.")

    FastHttpProtocol = _FastHttpProtocol


def http_protocol() -> Any:
    """The protocol class to give uvicorn's ``http`` option."""
    return FastHttpProtocol or NoDelayH11Protocol
